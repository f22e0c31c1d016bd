"""LoDoPaB-style low-dose CT physics (Leuschner et al., 2021), on ODL + astra.

Units and conventions:

* ``x`` is the *normalised attenuation* image, ``x = clip(mu / MU_MAX, 0, 1)``, with
  ``mu`` in 1/m. Networks, PSNR and SSIM work on ``x`` (data range 1).
* Images are square ``(N, N)`` float32 arrays indexed like the volumes' axial slices
  (``volume[:, :, k]``); the reconstruction domain is the square of side ``extent_m``
  metres centred on the origin, and reconstructions are defined on its inscribed disc.
* Projection data are *post-log* and normalised like ``x``: ``-log(counts / N0) / MU_MAX``.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.ndimage

MU_WATER = 20.0
"""Linear attenuation of water, 1/m."""
MU_AIR = 0.02
"""Linear attenuation of air, 1/m."""
MU_MAX = 81.35858
"""mu at 3071 HU, 1/m: the top of the normalised range."""
PHOTONS_PER_BIN = 4096
"""LoDoPaB's mean photon count per detector bin for an unattenuated ray (N0)."""
ZERO_COUNT_REPLACEMENT = 0.1
"""Photon count substituted for zero counts before the log."""
LODOPAB_EXTENT_M = 0.26
"""LoDoPaB's fixed reconstruction domain, metres."""
DEFAULT_HANN_SCALING = 0.641
"""LoDoPaB's reference FBP: Hann filter with this frequency scaling."""

# ODL 0.8.3 warns that astra_cpu is slow for large images (we parallelise over slices
# instead) and that pkg_resources is deprecated (pinned setuptools<81 still has it).
warnings.filterwarnings("ignore", message="The 'astra_cpu' backend may be too slow")
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")


def hu_to_mu(hu: np.ndarray | float) -> np.ndarray | float:
    """Hounsfield units to linear attenuation in 1/m."""
    return MU_WATER + np.asarray(hu, dtype=np.float64) * (MU_WATER - MU_AIR) / 1000.0


def mu_to_hu(mu: np.ndarray | float) -> np.ndarray | float:
    """Linear attenuation in 1/m to Hounsfield units."""
    return (np.asarray(mu, dtype=np.float64) - MU_WATER) * 1000.0 / (MU_WATER - MU_AIR)


def hu_to_normalized(hu: np.ndarray) -> np.ndarray:
    """HU to the clipped normalised attenuation ``x`` in [0, 1] (float32)."""
    return np.clip(hu_to_mu(hu) / MU_MAX, 0.0, 1.0).astype(np.float32)


def normalized_to_hu(x: np.ndarray) -> np.ndarray:
    """Normalised attenuation (unclipped, e.g. a noisy reconstruction) to HU (float32)."""
    return mu_to_hu(np.asarray(x, dtype=np.float64) * MU_MAX).astype(np.float32)


def hu_per_normalized_unit() -> float:
    """How many HU one unit of ``x`` spans (to express noise std in HU)."""
    return MU_MAX * 1000.0 / (MU_WATER - MU_AIR)


def disc_mask(size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of the centred inscribed disc of radius ``size / 2``.

    A pixel is inside when its centre lies within the disc; this is the region on which
    the simulated reconstructions are defined and on which PSNR and SSIM are computed.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    centre = (size - 1) / 2.0
    r2 = (np.arange(size) - centre) ** 2
    return (r2[:, None] + r2[None, :]) <= (size / 2.0) ** 2


def default_impl() -> str:
    """``'astra_cuda'`` where astra sees a CUDA device, else ``'astra_cpu'``."""
    try:
        import astra

        if astra.use_cuda():
            return "astra_cuda"
    except Exception as exc:  # astra missing CUDA libraries raises various errors
        warnings.warn(f"astra CUDA unavailable ({exc}); using astra_cpu", stacklevel=2)
    return "astra_cpu"


def poisson_data(line_integrals: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    """Noisy post-log data from noise-free line integrals of the normalised image.

    ``counts ~ Poisson(photons * exp(-MU_MAX * line_integrals))``; zero counts become
    :data:`ZERO_COUNT_REPLACEMENT`; returns ``-log(counts / photons) / MU_MAX`` (float32),
    in the units of ``line_integrals``.
    """
    if not photons > 0:
        raise ValueError(f"photons must be positive, got {photons}")
    expected = photons * np.exp(-np.asarray(line_integrals, dtype=np.float64) * MU_MAX)
    counts = np.maximum(rng.poisson(expected).astype(np.float64), ZERO_COUNT_REPLACEMENT)
    return (-np.log(counts / photons) / MU_MAX).astype(np.float32)


@dataclass(frozen=True)
class ScanGeometry:
    """A 2-D parallel-beam scan of a square slice.

    Args:
        size: image side ``N`` in pixels.
        extent_m: side of the square reconstruction domain in metres.
        num_angles: projection angles, evenly spaced over [0, pi).
        impl: ODL ray-transform back end, ``'astra_cpu'`` or ``'astra_cuda'``.
    """

    size: int
    extent_m: float
    num_angles: int = 1000
    impl: str = "astra_cpu"

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {self.size}")
        if not (0.01 <= self.extent_m <= 2.0):
            raise ValueError(f"extent_m must be a body-sized domain in metres (0.01-2), got {self.extent_m}")
        if self.num_angles < 1:
            raise ValueError(f"num_angles must be positive, got {self.num_angles}")
        if self.impl not in ("astra_cpu", "astra_cuda"):
            raise ValueError(f"impl must be 'astra_cpu' or 'astra_cuda', got {self.impl!r}")

    @property
    def pixel_size_mm(self) -> float:
        return 1000.0 * self.extent_m / self.size


class CTSimulator:
    """Forward projection, Poisson noise and FBP for one :class:`ScanGeometry`.

    Building the ODL operators costs time, so build one simulator per geometry and reuse
    it (:func:`simulator_for` caches them per process).

    The detector covers the domain's diagonal (ODL's ``parallel_beam_geometry``), and, to
    avoid the inverse crime, data are simulated from a ``upsample``-times finer bilinear
    upsampling of the image on the same domain and geometry.
    """

    def __init__(self, geometry: ScanGeometry, upsample: int = 2) -> None:
        import odl

        if upsample < 1:
            raise ValueError(f"upsample must be at least 1, got {upsample}")
        self.scan = geometry
        self.upsample = upsample
        half = geometry.extent_m / 2.0
        n = geometry.size
        self.space = odl.uniform_discr([-half, -half], [half, half], (n, n), dtype="float32")
        self.geometry = odl.tomo.parallel_beam_geometry(self.space, num_angles=geometry.num_angles)
        self.ray_transform = odl.tomo.RayTransform(self.space, self.geometry, impl=geometry.impl)
        self.fine_ray_transform = self.ray_transform
        if upsample > 1:
            fine = odl.uniform_discr([-half, -half], [half, half], (n * upsample, n * upsample), dtype="float32")
            self.fine_ray_transform = odl.tomo.RayTransform(fine, self.geometry, impl=geometry.impl)
        self._fbp_cache: dict[tuple[str, float], object] = {}

    @property
    def sinogram_shape(self) -> tuple[int, int]:
        """``(num_angles, num_detector_pixels)`` of the projection data."""
        return tuple(self.ray_transform.range.shape)  # type: ignore[return-value]

    def _check_image(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        n = self.scan.size
        if x.shape != (n, n):
            raise ValueError(f"expected a ({n}, {n}) image, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("image contains NaN or Inf")
        return x

    def project(self, x: np.ndarray, upsampled: bool = True) -> np.ndarray:
        """Noise-free line integrals of the normalised image ``x`` (units of ``x`` times metres)."""
        x = self._check_image(x)
        if upsampled and self.upsample > 1:
            # grid_mode: pixel areas, not pixel centres, are aligned (no half-pixel shift).
            fine = scipy.ndimage.zoom(x, self.upsample, order=1, mode="nearest", grid_mode=True)
            return np.asarray(self.fine_ray_transform(fine), dtype=np.float32)
        return np.asarray(self.ray_transform(x), dtype=np.float32)

    def noisy_data(self, x: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
        """Simulated post-log low-dose data for the normalised image ``x`` (see :func:`poisson_data`)."""
        return poisson_data(self.project(x), photons, rng)

    def fbp(self, data: np.ndarray, filter_type: str = "Ram-Lak", frequency_scaling: float = 1.0) -> np.ndarray:
        """Filtered back-projection of post-log data to a normalised ``(N, N)`` image.

        ``filter_type='Ram-Lak', frequency_scaling=1`` is the unapodised ramp filter (the
        simulated low-dose scan); ``'Hann'`` with ``frequency_scaling`` in (0, 1] is the
        FBP baseline.
        """
        if not 0.0 < frequency_scaling <= 1.0:
            raise ValueError(f"frequency_scaling must be in (0, 1], got {frequency_scaling}")
        key = (filter_type, float(frequency_scaling))
        op = self._fbp_cache.get(key)
        if op is None:
            import odl

            op = odl.tomo.fbp_op(self.ray_transform, filter_type=filter_type, frequency_scaling=frequency_scaling)
            self._fbp_cache[key] = op
        data = np.asarray(data, dtype=np.float32)
        if data.shape != self.sinogram_shape:
            raise ValueError(f"expected data of shape {self.sinogram_shape}, got {data.shape}")
        return np.asarray(op(data), dtype=np.float32)


@functools.lru_cache(maxsize=8)
def simulator_for(geometry: ScanGeometry, upsample: int = 2) -> CTSimulator:
    """A per-process cached :class:`CTSimulator` for ``geometry`` and ``upsample``."""
    return CTSimulator(geometry, upsample)
