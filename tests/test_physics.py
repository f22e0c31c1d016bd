"""Physics of the low-dose simulation: units, line integrals, noise, FBP."""

from __future__ import annotations

import numpy as np
import pytest

from training.physics import (
    MU_AIR,
    MU_MAX,
    MU_WATER,
    ZERO_COUNT_REPLACEMENT,
    CTSimulator,
    ScanGeometry,
    disc_mask,
    hu_per_normalized_unit,
    hu_to_mu,
    hu_to_normalized,
    normalized_to_hu,
)

SIZE = 64
EXTENT_M = 0.30


def _disc_image(size: int, radius_px: float, value: float) -> np.ndarray:
    centre = (size - 1) / 2
    i, j = np.mgrid[:size, :size]
    return np.where((i - centre) ** 2 + (j - centre) ** 2 <= radius_px**2, value, 0.0).astype(np.float32)


@pytest.fixture(scope="module")
def simulator() -> CTSimulator:
    return CTSimulator(ScanGeometry(size=SIZE, extent_m=EXTENT_M, num_angles=60))


def test_hu_scale_anchors():
    assert hu_to_mu(0.0) == pytest.approx(MU_WATER)
    assert hu_to_mu(-1000.0) == pytest.approx(MU_AIR)
    assert hu_to_mu(3071.0) == pytest.approx(MU_MAX)
    assert hu_to_normalized(np.array([3071.0, 5000.0, -1024.0])).tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_hu_round_trip_inside_the_normalised_range():
    hu = np.linspace(-1000, 3071, 1001)
    assert np.abs(normalized_to_hu(hu_to_normalized(hu)) - hu).max() < 0.05
    assert hu_per_normalized_unit() == pytest.approx(normalized_to_hu(np.array(1.0)) - normalized_to_hu(np.array(0.0)), rel=1e-5)


def test_line_integrals_of_a_disc_match_its_chords(simulator):
    """A disc of value v and radius r projects to 2 v sqrt(r^2 - s^2) at every angle."""
    radius_px, value = 20.0, 0.25
    data = simulator.project(_disc_image(SIZE, radius_px, value), upsampled=True)
    pixel_m = EXTENT_M / SIZE
    radius_m = radius_px * pixel_m
    s = simulator.geometry.det_partition.meshgrid[0].ravel()  # detector positions, m
    expected = 2 * value * np.sqrt(np.clip(radius_m**2 - s**2, 0, None))
    centre_bins = np.abs(s) < 0.6 * radius_m
    # Pixelation of the disc edge makes chords ragged by about a pixel's worth.
    np.testing.assert_allclose(data[:, centre_bins], np.broadcast_to(expected[centre_bins], data[:, centre_bins].shape),
                               rtol=0.03)
    assert data[:, np.abs(s) > 1.1 * radius_m].max() < 1e-3
    # Same integral at every angle: the disc is rotation invariant.
    assert data.sum(axis=1).std() / data.sum(axis=1).mean() < 0.01


def test_noise_free_ramp_fbp_reconstructs_the_image(simulator):
    x = _disc_image(SIZE, 24, 0.25) + _disc_image(SIZE, 8, 0.05)
    reconstruction = simulator.fbp(simulator.project(x))
    roi = _disc_image(SIZE, 20, 1.0) > 0  # away from the edge, where FBP rings
    assert np.abs(reconstruction[roi] - x[roi]).mean() < 0.01


def test_noise_is_reproducible_per_seed(simulator):
    x = _disc_image(SIZE, 24, 0.25)
    a = simulator.noisy_data(x, 4096, np.random.default_rng(1))
    b = simulator.noisy_data(x, 4096, np.random.default_rng(1))
    c = simulator.noisy_data(x, 4096, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_poisson_noise_variance_falls_with_photon_count(simulator):
    """Post-log variance ~ exp(A mu) / (N0 MU_MAX^2): 16x the photons, ~1/16 the variance."""
    x = _disc_image(SIZE, 24, hu_to_normalized(np.array(0.0)).item())  # a water cylinder
    clean = simulator.project(x)
    variances = {}
    for photons in (4096, 16 * 4096):
        rng = np.random.default_rng(0)
        noisy = np.stack([simulator.noisy_data(x, photons, rng) for _ in range(20)])
        variances[photons] = noisy.var(axis=0)
        predicted = np.exp(clean * MU_MAX) / (photons * MU_MAX**2)
        ratio = variances[photons].mean() / predicted.mean()
        assert 0.8 < ratio < 1.25, f"N0={photons}: measured/predicted variance {ratio:.2f}"
    ratio = variances[4096].mean() / variances[16 * 4096].mean()
    assert 13 < ratio < 19


def test_zero_counts_are_replaced_before_the_log(simulator):
    x = np.ones((SIZE, SIZE), np.float32)  # bone-dense square: almost no photons through
    data = simulator.noisy_data(x, photons=2.0, rng=np.random.default_rng(0))
    assert np.isfinite(data).all()
    assert data.max() == pytest.approx(-np.log(ZERO_COUNT_REPLACEMENT / 2.0) / MU_MAX, rel=1e-6)


def test_hann_fbp_is_less_noisy_than_ramp(simulator):
    x = _disc_image(SIZE, 24, 0.25)
    data = simulator.noisy_data(x, 4096, np.random.default_rng(0))
    roi = _disc_image(SIZE, 18, 1.0) > 0
    ramp = simulator.fbp(data, "Ram-Lak", 1.0)
    hann = simulator.fbp(data, "Hann", 0.641)
    assert hann[roi].std() < 0.5 * ramp[roi].std()
    assert hann[roi].mean() == pytest.approx(0.25, abs=0.02)


def test_simulator_validates_inputs(simulator):
    with pytest.raises(ValueError, match=r"expected a \(64, 64\) image"):
        simulator.project(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        simulator.project(np.full((SIZE, SIZE), np.nan))
    with pytest.raises(ValueError, match="photons must be positive"):
        simulator.noisy_data(np.zeros((SIZE, SIZE)), 0, np.random.default_rng())
    with pytest.raises(ValueError, match="frequency_scaling"):
        simulator.fbp(np.zeros(simulator.sinogram_shape), "Hann", 1.5)
    with pytest.raises(ValueError, match="extent_m"):
        ScanGeometry(size=64, extent_m=30.0)


def test_disc_mask_is_the_inscribed_disc():
    mask = disc_mask(8)
    assert mask[0, 3] and mask[0, 4] and not mask[0, 0]
    assert mask.sum() == pytest.approx(np.pi * 16, rel=0.15)
    np.testing.assert_array_equal(mask, mask.T)
    np.testing.assert_array_equal(mask, mask[::-1])


def test_upsampled_projection_of_an_off_centre_asymmetric_object_is_in_place(simulator):
    """The centroid of each projection is the object's centroid projected on the detector,
    ``s = X cos(theta) + Y sin(theta)`` with array axis 0 as x. An L-shaped object away from
    the centre and the diagonal would move under a flip or transpose of the upsampled image
    (tens of pixels), a half-pixel shift of it (0.5) or corner-aligned upsampling (0.15)."""
    x = np.zeros((SIZE, SIZE), np.float32)
    x[10:18, 40:52] = 0.3
    x[10:30, 40:44] = 0.3
    pixel_m = EXTENT_M / SIZE
    i, j = np.indices(x.shape)
    centre_x = ((i * x).sum() / x.sum() + 0.5) * pixel_m - EXTENT_M / 2
    centre_y = ((j * x).sum() / x.sum() + 0.5) * pixel_m - EXTENT_M / 2
    angles = simulator.geometry.angles
    expected = centre_x * np.cos(angles) + centre_y * np.sin(angles)
    s = simulator.geometry.det_partition.meshgrid[0].ravel()
    for upsampled in (True, False):
        data = simulator.project(x, upsampled=upsampled)
        centroid = (data * s).sum(axis=1) / data.sum(axis=1)
        assert np.abs(centroid - expected).max() < 0.05 * pixel_m, f"upsampled={upsampled}"
    # and the upsampled data are the same object's: total attenuation kept at every angle
    np.testing.assert_allclose(simulator.project(x).sum(axis=1), simulator.project(x, upsampled=False).sum(axis=1),
                               rtol=5e-3)
