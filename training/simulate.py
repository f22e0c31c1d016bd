"""Simulate a paired low-dose / full-dose data set from LiTS-format CT (``tact simulate``).

For every kept axial slice of every case: HU -> normalised attenuation ``x`` on an
``N x N`` grid, noisy post-log data from an upsampled (2x by default) forward projection
(:class:`training.physics.CTSimulator`), the low-dose scan as an unapodised (ramp) FBP and
the FBP baseline as a Hann FBP. Slices are simulated in a process pool; each finished
slice is written to ``.partial/`` at once, and a case's volumes are assembled when all its
slices are done, so an interrupted run resumes where it stopped. Each slice's noise comes
from its own seed (run seed, case id, source slice index): the result does not depend on
the number of workers or the order in which they finish.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from training import dataset as ds
from training.errors import DataError
from training.fileio import atomic_path, remove_stale_temporaries, save_json, save_nifti, save_npy
from training.parallel import process_pool
from training.loaders import find_lits_cases, load_lits_case
from training.physics import (
    DEFAULT_HANN_SCALING,
    LODOPAB_EXTENT_M,
    PHOTONS_PER_BIN,
    ScanGeometry,
    default_impl,
    hu_to_normalized,
    normalized_to_hu,
    simulator_for,
)
from training.volume import CTVolume

log = logging.getLogger(__name__)

DOMAINS = ("physical", "lodopab")
AIR_HU = -1000.0


@dataclass(frozen=True)
class SimulationSettings:
    """What defines a simulated data set; a re-run must use the same settings to resume.

    Args:
        photons: mean photons per detector bin of an unattenuated ray (N0).
        num_angles: parallel-beam angles over [0, pi).
        size: output slices are ``size x size`` pixels.
        domain: ``physical`` takes the reconstruction domain from the volume's pixel
            spacing; ``lodopab`` uses LoDoPaB's fixed 26 cm whatever the anatomy's size.
        fbp_scaling: frequency scaling of the Hann FBP baseline written with the data
            (``tact baseline fbp`` retunes it on the training split).
        keep_empty: keep slices whose segmentation is empty (the paper drops them).
        test_fraction: fraction of *patients* in the test split.
        seed: seeds the noise and the split.
        upsample: data are simulated from the image upsampled this many times (bilinear),
            to avoid the inverse crime; 1 projects the image itself.
        test_cases: patients always put in the test split (e.g. the real sample among
            phantoms); the others are split by ``test_fraction``.
    """

    photons: float = PHOTONS_PER_BIN
    num_angles: int = 1000
    size: int = 512
    domain: str = "physical"
    fbp_scaling: float = DEFAULT_HANN_SCALING
    keep_empty: bool = False
    test_fraction: float = 0.2
    seed: int = 0
    upsample: int = 2
    test_cases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.photons) and self.photons > 0):
            raise ValueError(f"photons must be a positive finite number, got {self.photons}")
        if self.num_angles < 1:
            raise ValueError(f"angles must be positive, got {self.num_angles}")
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        if not 0.0 < self.fbp_scaling <= 1.0:
            raise ValueError(f"fbp_scaling must be in (0, 1], got {self.fbp_scaling}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.seed < 0:
            raise ValueError(f"seed must not be negative, got {self.seed}")
        if self.upsample < 1:
            raise ValueError(f"upsample must be at least 1, got {self.upsample}")


@dataclass(frozen=True)
class PreparedCase:
    """A case resampled for simulation: normalised full-dose slices and their labels."""

    case_id: str
    x_full: np.ndarray  # (N, N, Z) float32 in [0, 1]
    labels: np.ndarray  # (N, N, Z) uint8
    affine: np.ndarray  # (4, 4) voxel -> RAS mm of the output grid
    extent_m: float
    source_slices: list[int]  # a contiguous range of the source volume's slices

    @property
    def unlabelled_slices(self) -> int:
        """Kept slices whose segmentation is empty (gaps inside the labelled range, or all with ``keep_empty``)."""
        return int(np.count_nonzero(~self.labels.any(axis=(0, 1))))


def split_by_patient(
    case_ids: Sequence[str], test_fraction: float, seed: int, test_cases: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Seeded patient-level split: no patient has slices in both splits.

    ``test_cases`` go to the test split; of the others, at least one goes there whenever
    ``test_fraction > 0`` (a single case therefore leaves the training split empty).
    """
    unknown = sorted(set(test_cases) - set(case_ids))
    if unknown:
        raise ValueError(f"test cases {unknown} are not among the input cases")
    ids = sorted((c for c in case_ids if c not in set(test_cases)), key=_natural_key)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = 0 if test_fraction == 0 or not ids else max(1, int(round(test_fraction * len(ids))))
    test = sorted([*(ids[i] for i in order[:n_test]), *test_cases], key=_natural_key)
    train = sorted((ids[i] for i in order[n_test:]), key=_natural_key)
    return {"train": train, "test": test}


def _natural_key(case_id: str) -> tuple[int, str]:
    return (int(case_id), "") if case_id.isdigit() else (1 << 62, case_id)


def prepare_case(volume: CTVolume, settings: SimulationSettings) -> PreparedCase:
    """Select the slices to simulate and resample them to ``size x size`` normalised images.

    The slices kept are the contiguous range from the first to the last slice with a
    non-empty segmentation (every slice with ``keep_empty``): as in the paper, slices
    outside the labelled range are dropped, and a range, unlike a selection, keeps the
    volume's slice spacing, so the output's affine places every slice where it was.

    A non-square field of view is padded with air to a square first, so that the domain
    is the square that holds the whole slice; in-plane resampling uses MONAI's ``Resize``
    (anti-aliased bilinear for images, area fractions for labels), with pixel areas aligned
    so that labels stay on the image.
    """
    if volume.segmentation is None:
        raise DataError(volume.sources[0] if volume.sources else None, "a segmentation is required")
    sx, sy, sz = volume.spacing
    if abs(sx - sy) > 0.01 * max(sx, sy):
        raise DataError(volume.sources[0], f"anisotropic in-plane spacing {sx:.3f} x {sy:.3f} mm is not supported; resample first")
    labelled = [k for k in range(volume.shape[2]) if volume.segmentation[:, :, k].any()]
    if not labelled and not settings.keep_empty:
        raise DataError(volume.sources[0], "no slice has a non-empty segmentation (use --keep-empty to keep all slices)")
    # One contiguous range, so that the output volume keeps an even slice spacing: the
    # first to the last labelled slice, with any unlabelled slices between them.
    keep = list(range(volume.shape[2])) if settings.keep_empty else list(range(labelled[0], labelled[-1] + 1))
    # Resample in normalised units, where air is ~0: the anti-aliasing filter pads with
    # zeros, which in HU would be water at the border.
    x = hu_to_normalized(volume.hu[:, :, keep])
    labels = volume.segmentation[:, :, keep].astype(np.uint8)
    # Pad to a square field of view with air (labels with background).
    nx, ny = x.shape[:2]
    side = max(nx, ny)
    pad = [((side - nx) // 2, side - nx - (side - nx) // 2), ((side - ny) // 2, side - ny - (side - ny) // 2), (0, 0)]
    if side != nx or side != ny:
        x = np.pad(x, pad, constant_values=hu_to_normalized(np.array(AIR_HU)))
        labels = np.pad(labels, pad, constant_values=0)
    n = settings.size
    if side != n:
        x = np.clip(_resize_slices(x, n, "bilinear"), 0.0, 1.0)
        labels = _resize_labels(labels, n)
    pixel_mm = sx * side / n
    extent_m = pixel_mm * n / 1000.0 if settings.domain == "physical" else LODOPAB_EXTENT_M
    # Output grid: same orientation, in-plane pixel scaled, origin at the padded grid's
    # corner pixel centre, first kept slice as z origin.
    affine = volume.affine.copy()
    scale = side / n
    affine[:3, 0] *= scale
    affine[:3, 1] *= scale
    shift = np.array([-pad[0][0] + (scale - 1) / 2, -pad[1][0] + (scale - 1) / 2, keep[0], 1.0])
    affine[:3, 3] = (volume.affine @ shift)[:3]
    return PreparedCase(volume.case_id, x, labels, affine, float(extent_m), keep)


def _resize_slices(stack: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize each slice of an ``(X, Y, Z)`` stack to ``(size, size)`` with MONAI (pixel areas aligned)."""
    from monai.transforms import Resize

    channels_first = np.moveaxis(stack, 2, 0).astype(np.float32)  # slices as channels
    # Anti-aliasing (a Gaussian blur before sampling) belongs to interpolation; area averaging needs none.
    resized = Resize((size, size), mode=mode, anti_aliasing=mode == "bilinear")(channels_first)
    return np.moveaxis(np.asarray(resized), 0, 2)


def _resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Resize an ``(X, Y, Z)`` label stack to ``(size, size)`` slices, aligned with the image.

    Each class's indicator is averaged over the output pixel's area (MONAI ``Resize`` in
    ``area`` mode) and the class covering most of it wins. Nearest-neighbour resizing
    (PyTorch's floor-based ``nearest``) would shift the labels by ``(factor - 1) / 2`` source
    pixels against the area-aligned image, and ``nearest-exact`` by half a pixel at even
    factors.
    """
    classes = np.arange(int(labels.max()) + 1, dtype=labels.dtype)
    fractions = np.stack([_resize_slices((labels == c).astype(np.float32), size, "area") for c in classes])
    return classes[np.argmax(fractions, axis=0)].astype(np.uint8)


@dataclass(frozen=True)
class _SliceTask:
    x_full: np.ndarray
    geometry: ScanGeometry
    upsample: int
    photons: float
    fbp_scaling: float
    seed: tuple[int, int, int]
    out: Path


def _slice_seed(seed: int, case_id: str, source_slice: int) -> tuple[int, int, int]:
    return (seed, zlib.crc32(case_id.encode()), source_slice)


def _simulate_slice(task: _SliceTask) -> Path:
    """Worker: simulate one slice and write ``{lowdose, fbp, sinogram}`` to ``task.out``."""
    simulator = simulator_for(task.geometry, task.upsample)
    rng = np.random.default_rng(np.random.SeedSequence(task.seed))
    data = simulator.noisy_data(task.x_full, task.photons, rng)
    lowdose = simulator.fbp(data, "Ram-Lak", 1.0)
    fbp = simulator.fbp(data, "Hann", task.fbp_scaling)
    with atomic_path(task.out) as tmp:
        np.savez(tmp, lowdose=lowdose, fbp=fbp, sinogram=data)
    return task.out


def simulate_dataset(
    lits_dir: str | Path,
    out: str | Path,
    settings: SimulationSettings = SimulationSettings(),
    workers: int | None = None,
    impl: str | None = None,
    progress: bool = True,
) -> ds.SimulatedDataset:
    """Simulate (or finish simulating) the data set ``out`` from the LiTS folder ``lits_dir``.

    Every input case still to simulate is read and checked first (files, geometry, HU,
    labels, slice selection); only then is anything written, so a bad case among good ones
    is refused before any work and leaves nothing behind.

    Args:
        lits_dir: folder of ``volume-K.nii[.gz]`` / ``segmentation-K.nii[.gz]`` pairs.
        out: the data set folder (created; resumed if it holds an unfinished run with the
            same settings, projector and sources).
        settings: physics, size, split and seed.
        workers: processes (default: every core available).
        impl: ODL back end (default ``astra_cuda`` where a GPU is present, else ``astra_cpu``);
            recorded in the manifest, and a resume must use the same.
        progress: show a progress bar.

    Returns:
        the finished data set.

    Raises:
        DataError: unusable input (naming the file), or ``out`` holding a data set made with
            other settings, another projector or other cases.
    """
    out = Path(out)
    cases = find_lits_cases(lits_dir)
    impl = impl or default_impl()
    previous = _previous_manifest(out, settings, impl, cases)
    done = {cid for cid, record in (previous or {}).get("cases", {}).items() if record.get("complete")}
    todo = [(cid, v, s) for cid, v, s in cases if cid not in done]
    if not todo:
        log.info("%s: all %d cases already simulated", out, len(cases))
        return ds.SimulatedDataset(out)
    for case_id, volume_file, segmentation_file in tqdm(todo, desc="check inputs", unit="case", disable=not progress):
        prepare_case(load_lits_case(volume_file, segmentation_file, case_id), settings)
    manifest = previous if previous is not None else _new_manifest(out, settings, impl, cases)
    remove_stale_temporaries(out)
    log.info("simulating %d case(s) with %s worker(s), %s, into %s", len(todo), workers or "all", impl, out)
    with process_pool(workers) as pool, tqdm(
        total=0, unit="slice", desc="simulate", disable=not progress
    ) as bar:
        for case_id, volume_file, segmentation_file in todo:
            prepared = prepare_case(load_lits_case(volume_file, segmentation_file, case_id), settings)
            if prepared.unlabelled_slices:
                log.info("case %s: %d slice(s) inside the labelled range have an empty segmentation", case_id,
                         prepared.unlabelled_slices)
            _simulate_case(pool, bar, prepared, out, settings, impl)
            manifest["cases"][case_id] = {
                "sources": [str(Path(volume_file).resolve()), str(Path(segmentation_file).resolve())],
                "num_slices": len(prepared.source_slices),
                "source_slices": prepared.source_slices,
                "unlabelled_slices": prepared.unlabelled_slices,
                "extent_m": prepared.extent_m,
                "pixel_spacing_mm": [float(v) for v in np.linalg.norm(prepared.affine[:3, :3], axis=0)],
                "complete": True,
            }
            save_json(out / ds.MANIFEST, manifest)
            shutil.rmtree(out / ".partial" / case_id, ignore_errors=True)
    shutil.rmtree(out / ".partial", ignore_errors=True)
    return ds.SimulatedDataset(out)


def _simulate_case(pool, bar, prepared: PreparedCase, out: Path, settings: SimulationSettings, impl: str) -> None:
    partial = out / ".partial" / prepared.case_id
    geometry = ScanGeometry(settings.size, prepared.extent_m, settings.num_angles, impl)
    tasks = [
        _SliceTask(
            np.ascontiguousarray(prepared.x_full[:, :, z]),
            geometry,
            settings.upsample,
            settings.photons,
            settings.fbp_scaling,
            _slice_seed(settings.seed, prepared.case_id, k),
            partial / f"{k:05d}.npz",
        )
        for z, k in enumerate(prepared.source_slices)
    ]
    pending = [t for t in tasks if not t.out.is_file()]
    bar.total += len(pending)
    bar.set_postfix(case=prepared.case_id)
    bar.refresh()
    for _ in pool.imap_unordered(_simulate_slice, pending):
        bar.update()
    slices = [np.load(t.out) for t in tasks]
    lowdose, fbp = (normalized_to_hu(np.stack([s[key] for s in slices], axis=-1)) for key in ("lowdose", "fbp"))
    cid = prepared.case_id
    save_nifti(ds.volume_path(out, ds.FULLDOSE, cid), normalized_to_hu(prepared.x_full), prepared.affine, "full dose HU")
    save_nifti(ds.volume_path(out, ds.SEGMENTATION, cid), prepared.labels, prepared.affine, "0 bg, 1 liver, 2 tumor")
    save_nifti(ds.volume_path(out, "fbp", cid), fbp, prepared.affine, "Hann FBP HU")
    save_npy(ds.sinogram_path(out, cid), np.stack([s["sinogram"] for s in slices], axis=0))
    # The low-dose image is written last: its presence marks a finished case for viewers.
    save_nifti(ds.volume_path(out, ds.LOWDOSE, cid), lowdose, prepared.affine, "low-dose HU")


def _previous_manifest(out: Path, settings: SimulationSettings, impl: str,
                       cases: list[tuple[str, Path, Path]]) -> dict | None:
    """The manifest of a run in ``out`` to resume (same settings, projector and cases), or None if there is none.

    Raises:
        DataError: ``out`` holds a data set made with other settings, projector or cases.
    """
    path = out / ds.MANIFEST
    if not path.is_file():
        return None
    previous = json.loads(path.read_text())
    recorded = previous.get("simulation", {})
    recorded.setdefault("test_cases", [])  # data sets from before the option
    recorded.setdefault("projector", "astra_cpu")  # before it was recorded, only astra_cpu had run
    if recorded["projector"] != impl:
        raise DataError(path, f"this data set was simulated with the {recorded['projector']} projector, and this run "
                              f"would use {impl}; resume it with --impl {recorded['projector']} or choose a new --out")
    if recorded != _settings_record(settings, impl):
        raise DataError(out, f"holds a data set simulated with other settings {recorded}; "
                        "choose a new --out or repeat the same settings to resume")
    known = set(previous["split"]["train"]) | set(previous["split"]["test"])
    case_ids = [c for c, _, _ in cases]
    if known != set(case_ids):
        raise DataError(out, f"holds a data set of cases {sorted(known)}, but the input has {sorted(case_ids)}")
    return previous


def _new_manifest(out: Path, settings: SimulationSettings, impl: str, cases: list[tuple[str, Path, Path]]) -> dict:
    """Start the manifest of a new data set in ``out`` (written at once)."""
    case_ids = [c for c, _, _ in cases]
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": ds.FORMAT,
        "version": ds.FORMAT_VERSION,
        "simulation": _settings_record(settings, impl),
        "split": {"by": "patient", "seed": settings.seed,
                  **split_by_patient(case_ids, settings.test_fraction, settings.seed, settings.test_cases)},
        "cases": {},
        "methods": {"fbp": {"filter": "Hann", "frequency_scaling": settings.fbp_scaling, "tuned_on": None}},
    }
    save_json(out / ds.MANIFEST, manifest)
    return manifest


def _settings_record(settings: SimulationSettings, impl: str) -> dict:
    """The settings and the projector as the manifest stores them (JSON types: tuples become lists)."""
    return json.loads(json.dumps(asdict(settings))) | {"projector": impl}
