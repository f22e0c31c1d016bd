"""A volume's slices on a model's pixel grid and back (`training.grid`), and whole-volume inference.

Geometry is checked against independent references: nibabel's ``as_closest_canonical``
for the voxel order, and the area-aligned pixel-centre formula for in-plane resampling.
The networks in the volume tests are small real modules with a known answer (identity, a
threshold classifier), so that any misplaced voxel shows.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from training.checkpoints import ModelFile
from training.grid import ModelGrid, hu_to_network_input, in_plane_spacing
from training.inference import reconstruct_and_segment
from training.networks import UNetConfig
from training.physics import MU_MAX, hu_to_mu, normalized_to_hu


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def affine_of(spacing: tuple[float, float, float], order: tuple[int, int, int], flips: tuple[int, int, int],
              tilt_degrees: float = 0.0) -> np.ndarray:
    """A voxel-to-RAS affine whose voxel axis a runs along world axis order[a] (flipped where -1), then tilted."""
    direction = np.zeros((3, 3))
    for voxel_axis, (world_axis, flip) in enumerate(zip(order, flips)):
        direction[world_axis, voxel_axis] = flip
    direction = rotation(np.array([1.0, 0.3, 0.2]), tilt_degrees) @ direction
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing)
    affine[:3, 3] = [-100.0, 40.0, 12.5]
    return affine


def asymmetric_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """HU volume with air, a body and an off-centre L-shaped bright object: any flip or transpose changes it."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[1:-1, 1:-1, :] = 40.0 + rng.normal(0, 20, (shape[0] - 2, shape[1] - 2, shape[2]))
    hu[2:6, 3:5, 1:3] = 900.0
    hu[2:4, 5:9, 1:3] = 900.0
    return hu


CASES = [
    ((1.0, 1.0, 2.0), (0, 1, 2), (1, 1, 1), 0.0),      # canonical RAS
    ((1.0, 1.0, 2.0), (0, 1, 2), (-1, -1, 1), 0.0),    # LPS, as DICOM stores it
    ((2.0, 1.0, 1.0), (2, 0, 1), (1, -1, 1), 0.0),     # slice axis first, permuted
    ((1.0, 1.0, 2.0), (1, 0, 2), (1, 1, -1), 17.0),    # oblique: tilted 17 degrees
]


@pytest.mark.parametrize("spacing,order,flips,tilt", CASES)
def test_to_model_matches_nibabels_canonical_order_and_round_trips_exactly(spacing, order, flips, tilt):
    shape = (12, 10, 6)
    affine = affine_of(spacing, order, flips, tilt)
    hu = asymmetric_volume(shape)
    grid = ModelGrid(shape, affine, (0.5, 2.5), multiple=4)
    assert not grid.resampled
    slices = grid.to_model(hu)
    canonical = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(hu, affine)).dataobj)
    expected = np.moveaxis(hu_to_network_input(canonical), 2, 0)
    (px, qx), (py, qy) = grid.padding
    assert slices.shape[1] % 4 == 0 and slices.shape[2] % 4 == 0
    np.testing.assert_array_equal(slices[:, px : slices.shape[1] - qx, py : slices.shape[2] - qy], expected)
    air = hu_to_network_input(np.array(-1000.0))
    assert np.all(slices[:, :px] == air) and np.all(slices[:, :, slices.shape[2] - qy :] == air)
    back = normalized_to_hu(grid.from_model(slices))
    assert back.shape == hu.shape
    np.testing.assert_allclose(back, hu, atol=0.05)


def test_from_model_keeps_a_channel_axis_in_the_volumes_voxel_order():
    shape = (8, 12, 4)
    affine = affine_of((1.0, 1.0, 2.0), (1, 0, 2), (-1, 1, 1))
    grid = ModelGrid(shape, affine, (1.0, 1.0), multiple=8)
    hu = asymmetric_volume(shape)
    x = grid.to_model(hu)
    stacked = np.stack([x, 2 * x], axis=1)  # (Z, C, H, W)
    back = grid.from_model(stacked)
    assert back.shape == shape + (2,)
    np.testing.assert_allclose(back[..., 1], 2 * back[..., 0], rtol=1e-6)
    np.testing.assert_allclose(normalized_to_hu(back[..., 0]), hu, atol=0.05)


def _centroid(image: np.ndarray) -> np.ndarray:
    weights = np.clip(image - np.median(image), 0, None)
    grid = np.indices(image.shape)
    return np.array([(g * weights).sum() / weights.sum() for g in grid])


@pytest.mark.parametrize("offset", [0.0, 0.25, 0.5, 0.75])
def test_resampling_keeps_pixel_centres_aligned(offset):
    """At 1 mm input and a 4 mm model, a blob lands where the area-aligned centre formula says.

    A model pixel i covers input pixels [4i, 4i + 4): its centre is input pixel 4i + 1.5, so
    an input centroid c maps to (c - 1.5) / 4. A floor-based nearest or corner-aligned
    resize puts it 0.375 or more model pixels off.
    """
    shape = (64, 64, 2)
    affine = affine_of((1.0, 1.0, 3.0), (0, 1, 2), (1, 1, 1))
    yy, xx = np.meshgrid(np.arange(64), np.arange(64), indexing="xy")
    centre = np.array([20.3 + offset, 37.6 - offset])
    blob = np.exp(-(((xx.T - centre[0]) ** 2) + ((yy.T - centre[1]) ** 2)) / (2 * 4.0**2))
    hu = np.repeat((-1000 + 1500 * blob)[:, :, None], 2, axis=2).astype(np.float32)
    grid = ModelGrid(shape, affine, (4.0, 4.0), multiple=8)
    assert grid.resampled and grid.slice_shape == (16, 16) and grid.padding == ((0, 0), (0, 0))
    model = grid.to_model(hu)[0]
    measured = _centroid(model)
    expected = (_centroid(hu[:, :, 0]) - 1.5) / 4
    assert np.abs(measured - expected).max() < 0.05
    back = grid.from_model(grid.to_model(hu))
    assert np.abs(_centroid(back[:, :, 0]) - _centroid(hu_to_network_input(hu)[:, :, 0])).max() < 0.1


def test_spacing_outside_the_trained_range_is_resampled_to_the_nearer_end():
    affine = affine_of((0.8, 0.8, 2.0), (0, 1, 2), (-1, -1, 1))
    grid = ModelGrid((100, 100, 3), affine, (2.0, 4.0), multiple=16)
    assert grid.model_spacing_mm == (2.0, 2.0) and grid.slice_shape == (40, 40)
    assert grid.padding == ((4, 4), (4, 4))
    assert in_plane_spacing(affine_of((2.0, 1.0, 1.0), (2, 0, 1), (1, 1, 1))) == pytest.approx((1.0, 1.0, 2.0))


def test_bad_grids_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match="invertible"):
        ModelGrid((4, 4, 4), np.zeros((4, 4)), (1.0, 1.0), 4)
    with pytest.raises(ValueError, match="spacing_range_mm"):
        ModelGrid((4, 4, 4), np.eye(4), (2.0, 1.0), 4)
    grid = ModelGrid((4, 4, 4), np.eye(4), (1.0, 1.0), 4)
    with pytest.raises(ValueError, match="expected a volume of shape"):
        grid.to_model(np.zeros((4, 4, 5)))


# ---------------------------------------------------------------------------------------
# Whole-volume inference with networks whose answer is known


class Identity(nn.Module):
    """f that returns its input: the reconstruction must equal the input voxel for voxel."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Threshold(nn.Module):
    """g that calls 'tumour' above 500 HU, 'liver' above 0 HU and background elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.sharpness = nn.Parameter(torch.tensor(200.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def level(hu: float) -> float:
            return float(hu_to_mu(hu) / MU_MAX)

        liver = self.sharpness * (x - level(0.0))
        tumour = self.sharpness * (x - level(500.0))
        return torch.cat([torch.zeros_like(x), liver, liver + tumour], dim=1)


def model_file(task: str, spacing: tuple[float, float]) -> ModelFile:
    imaging = {"pixel_spacing_mm": {"min": spacing[0], "median": spacing[0], "max": spacing[1]},
               "input_hu_percentiles": [-1000.0, -50.0, 300.0]}
    return ModelFile(Path(f"{task}.pt"), task, 0.5, UNetConfig(features=4, depth=2), {}, 1, {}, imaging)


def expected_labels(hu: np.ndarray) -> np.ndarray:
    return np.where(hu > 500, 2, np.where(hu > 0, 1, 0)).astype(np.uint8)


@pytest.mark.parametrize("spacing,order,flips,tilt", CASES)
def test_volume_inference_answers_on_the_inputs_own_voxels(spacing, order, flips, tilt):
    shape = (14, 10, 5)
    affine = affine_of(spacing, order, flips, tilt)
    hu = asymmetric_volume(shape, seed=2)
    result = reconstruct_and_segment(hu, affine, reconstructor=(Identity(), model_file("reconstruction", (0.5, 3.0))),
                                     segmenter=(Threshold(), model_file("segmentation", (0.5, 3.0))), batch_size=2)
    assert result.reconstruction_hu.shape == shape and result.reconstruction_hu.dtype == np.float32
    np.testing.assert_allclose(result.reconstruction_hu, hu, atol=0.05)
    assert result.labels.dtype == np.uint8
    np.testing.assert_array_equal(result.labels, expected_labels(hu))
    assert not result.resampled


def test_volume_inference_on_a_resampled_grid_keeps_structures_in_place():
    """1 mm input, 2 mm model: a 6 mm cube of 'tumour' comes back where it was (within a voxel at its edges)."""
    shape = (40, 36, 4)
    affine = affine_of((1.0, 1.0, 2.5), (0, 1, 2), (-1, -1, 1), 9.0)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[4:36, 4:32] = 60.0
    hu[10:16, 20:26] = 900.0
    progress = []
    result = reconstruct_and_segment(hu, affine, segmenter=(Threshold(), model_file("segmentation", (2.0, 2.0))),
                                     batch_size=3, progress=lambda done, total: progress.append((done, total)))
    assert result.resampled and result.model_spacing_mm == (2.0, 2.0)
    assert progress == [(3, 4), (4, 4)]
    truth = expected_labels(hu)
    tumour = result.labels == 2
    assert np.array_equal(np.argwhere(tumour).mean(0)[:2], np.argwhere(truth == 2).mean(0)[:2])
    assert (tumour != (truth == 2)).sum() / (truth == 2).sum() < 0.5  # only edge voxels may differ


def test_inputs_unlike_the_training_data_are_served_with_warnings():
    shape = (16, 16, 3)
    hu = asymmetric_volume(shape)
    affine = affine_of((0.4, 0.4, 1.0), (0, 1, 2), (1, 1, 1))
    result = reconstruct_and_segment(hu + 2000, affine, reconstructor=(Identity(), model_file("reconstruction", (2.0, 3.0))))
    text = " ".join(result.warnings)
    assert "pixel spacing 0.4 mm" in text and "percentile" in text
    fine = reconstruct_and_segment(hu, affine_of((2.0, 2.0, 1.0), (0, 1, 2), (1, 1, 1)),
                                   reconstructor=(Identity(), model_file("reconstruction", (2.0, 3.0))))
    assert fine.warnings == []
    version_1 = ModelFile(Path("old.pt"), "reconstruction", 0.0, UNetConfig(features=4, depth=2), {}, 1, {}, None, 1)
    assert "version 1" in reconstruct_and_segment(hu, affine, reconstructor=(Identity(), version_1)).warnings[0]


def test_volume_inference_refuses_arrays_that_are_not_ct_volumes():
    f = (Identity(), model_file("reconstruction", (1.0, 1.0)))
    with pytest.raises(ValueError, match="3-D"):
        reconstruct_and_segment(np.zeros((4, 4)), np.eye(4), reconstructor=f)
    bad = np.zeros((8, 8, 2), dtype=np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        reconstruct_and_segment(bad, np.eye(4), reconstructor=f)
    with pytest.raises(ValueError, match="reconstructor, a segmenter"):
        reconstruct_and_segment(bad, np.eye(4))


def test_uncertainty_is_highest_where_g_cannot_decide():
    """g's mean entropy over the body: 1/3-1/3-1/3 everywhere is 1, a clear image is near 0."""
    from training.inference import mean_entropy

    shape = (20, 20, 2)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    clear = np.full(shape, -1000.0, dtype=np.float32)
    clear[4:16, 4:16] = 300.0  # far above the liver threshold, far below the tumour one
    ambiguous = clear.copy()
    ambiguous[4:16, 4:16] = 0.0  # exactly at g's liver threshold: liver and background equally likely
    g = (Threshold(), model_file("segmentation", (2.0, 2.0)))
    sure = reconstruct_and_segment(clear, affine, segmenter=g).uncertainty
    unsure = reconstruct_and_segment(ambiguous, affine, segmenter=g).uncertainty
    assert sure < 0.05 and unsure > 0.5
    uniform = np.full((1, 3, 2, 2), 1 / 3)
    assert mean_entropy(uniform, np.ones((1, 2, 2), bool)) == pytest.approx(1.0)
    assert np.isnan(reconstruct_and_segment(clear, affine, reconstructor=(Identity(), g[1])).uncertainty)
