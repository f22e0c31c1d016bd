"""Cross-checks of training.metrics against scikit-image, MONAI and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, PSNRMetric, SSIMMetric, compute_dice
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from training.metrics import (
    DICE_CONVENTIONS,
    DICE_LABELS,
    dice_counts,
    dice_from_counts,
    dice_per_class,
    dice_scores,
    mean_dice,
    psnr,
    roi_psnr_ssim,
    ssim,
)
from training.physics import disc_mask
from training.volume import LABEL_LIVER, LABEL_TUMOR

SHAPES = [(64, 64), (48, 80), (33, 57)]


def image_pair(seed: int, shape: tuple[int, int], noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A smooth reference in [0, 1] and a noisy reconstruction of it."""
    rng = np.random.default_rng(seed)
    reference = gaussian_filter(rng.random(shape), sigma=2.0)
    reference = (reference - reference.min()) / np.ptp(reference)
    reconstruction = reference + noise * rng.standard_normal(shape)
    return reconstruction, reference


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W) array as a MONAI (B=1, C=1, H, W) float64 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float64))[None, None]


def one_hot(labels: np.ndarray, num_classes: int = 3) -> torch.Tensor:
    """(B, spatial...) integer labels as a MONAI (B, C, spatial...) one-hot tensor."""
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), num_classes)
    return onehot.movedim(-1, 1).float()


# --------------------------------------------------------------------------------- PSNR


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_psnr_matches_skimage_and_monai(seed: int, shape: tuple[int, int]) -> None:
    rec, ref = image_pair(seed, shape)
    value = psnr(rec, ref)
    assert value == pytest.approx(peak_signal_noise_ratio(ref, rec, data_range=1.0), abs=1e-10)
    monai_value = PSNRMetric(max_val=1.0)(as_tensor(rec), as_tensor(ref)).item()
    assert value == pytest.approx(monai_value, abs=1e-9)
    assert 15.0 < value < 25.0  # noise std 0.1 gives about 20 dB


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_with_mask_is_psnr_of_the_masked_pixels(seed: int) -> None:
    rec, ref = image_pair(seed, (64, 64))
    mask = disc_mask(64)
    expected = peak_signal_noise_ratio(ref[mask], rec[mask], data_range=1.0)
    assert psnr(rec, ref, mask) == pytest.approx(expected, abs=1e-10)
    # pixels outside the mask do not count, however wrong they are
    corrupted = np.where(mask, rec, 50.0)
    assert psnr(corrupted, ref, mask) == pytest.approx(expected, abs=1e-10)
    assert psnr(corrupted, ref) < expected - 20.0


def test_psnr_known_values() -> None:
    ref = np.full((16, 24), 0.4)
    assert psnr(ref + 0.1, ref) == pytest.approx(20.0, abs=1e-9)
    assert psnr(ref - 0.01, ref) == pytest.approx(40.0, abs=1e-9)
    # data_range scales the peak: constant error 0.1 on a range of 2 is 20 + 20 log10(2) dB
    assert psnr(ref + 0.1, ref, data_range=2.0) == pytest.approx(20.0 + 20.0 * math.log10(2.0))
    assert psnr(ref, ref) == math.inf
    roi = disc_mask(16)
    wrong_outside = np.where(roi, ref[:, :16], 0.0)
    assert psnr(wrong_outside, ref[:, :16], roi) == math.inf


# --------------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_ssim_without_mask_is_skimage_mean_ssim(seed: int, shape: tuple[int, int]) -> None:
    rec, ref = image_pair(seed, shape)
    expected = structural_similarity(ref, rec, data_range=1.0)
    assert ssim(rec, ref) == expected
    # an all-true mask excludes the same 3-pixel border as scikit-image
    assert ssim(rec, ref, np.ones(shape, dtype=bool)) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected < 0.95


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_rectangular_mask_equals_skimage_on_the_window_padded_crop(seed: int) -> None:
    # A pixel >= 3 px inside a crop sees the same 7x7 window as in the full image, and
    # scikit-image averages a crop's map without its 3 px border: the two means must agree.
    rec, ref = image_pair(seed, (64, 72))
    mask = np.zeros(ref.shape, dtype=bool)
    mask[10:40, 20:61] = True
    crop = (slice(7, 43), slice(17, 64))
    expected = structural_similarity(ref[crop], rec[crop], data_range=1.0)
    assert ssim(rec, ref, mask) == pytest.approx(expected, abs=1e-10)
    assert ssim(rec, ref, mask) != pytest.approx(ssim(rec, ref), abs=1e-4)


def test_ssim_ignores_corruption_outside_the_mask() -> None:
    rec, ref = image_pair(3, (64, 64), noise=0.0)
    mask = np.pad(disc_mask(40), 12)  # centred disc of radius 20
    rng = np.random.default_rng(3)
    # corrupt only what no 7x7 window centred in the disc reaches (3 * sqrt(2) < 5 px)
    squared_radius = (np.arange(64)[:, None] - 31.5) ** 2 + (np.arange(64)[None, :] - 31.5) ** 2
    far_outside = squared_radius > (20.0 + 5.0) ** 2
    assert far_outside.sum() > 1000
    corrupted = np.where(far_outside, rng.random(ref.shape), ref)
    assert ssim(corrupted, ref, mask) == pytest.approx(1.0, abs=1e-12)
    assert ssim(corrupted, ref) < 0.95


def test_ssim_known_values() -> None:
    ref = np.full((20, 20), 0.5)
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    rec, textured = image_pair(4, (32, 32), noise=0.0)
    assert ssim(rec, textured) == pytest.approx(1.0, abs=1e-12)
    # a constant offset c on a constant image leaves only the luminance term:
    # (2 a (a + c) + C1) / (a^2 + (a + c)^2 + C1), C1 = (0.01 * data_range)^2
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)
    assert ssim(ref + 0.1, ref) == pytest.approx(expected, abs=1e-12)
    assert ssim(ref + 0.1, ref, disc_mask(20)) == pytest.approx(expected, abs=1e-12)
    # on a textured image an offset lowers SSIM, less than the same error as noise does
    noisy, _ = image_pair(4, (32, 32), noise=0.1)
    assert ssim(noisy, textured) < ssim(textured + 0.1, textured) < 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_skimage_and_monai_ssim_agree_when_conventions_match(seed: int) -> None:
    # The project uses scikit-image's defaults (7x7 uniform window, sample covariance), as
    # dival does for LoDoPaB. MONAI's SSIMMetric uses population covariance; with the same
    # window the two libraries agree, which validates the map the project averages.
    rec, ref = image_pair(seed, (64, 64))
    gaussian_skimage = structural_similarity(
        ref, rec, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    gaussian_monai = SSIMMetric(spatial_dims=2, data_range=1.0)(as_tensor(rec), as_tensor(ref))
    assert gaussian_skimage == pytest.approx(gaussian_monai.item(), abs=1e-6)
    uniform_skimage = structural_similarity(
        ref, rec, data_range=1.0, win_size=7, use_sample_covariance=False
    )
    uniform_monai = SSIMMetric(spatial_dims=2, data_range=1.0, kernel_type="uniform", win_size=7)(
        as_tensor(rec), as_tensor(ref)
    )
    assert uniform_skimage == pytest.approx(uniform_monai.item(), abs=1e-6)
    # the sample-covariance convention is a measurable difference, not a no-op
    assert abs(ssim(rec, ref) - uniform_monai.item()) > 1e-5


# --------------------------------------------------------------------------------- ROI


def test_disc_mask_is_the_inscribed_disc() -> None:
    mask = disc_mask(512)
    assert mask.shape == (512, 512) and mask.dtype == bool
    assert abs(mask.sum() / (math.pi * 256**2) - 1.0) < 0.005
    assert np.array_equal(mask, mask[::-1, :])
    assert np.array_equal(mask, mask[:, ::-1])
    assert np.array_equal(mask, mask.T)
    for row, col in [(0, 255), (0, 256), (511, 255), (511, 256), (255, 0), (256, 511)]:
        assert mask[row, col]
    for row, col in [(0, 0), (0, 511), (511, 0), (511, 511), (0, 200)]:
        assert not mask[row, col]


def test_roi_psnr_ssim_uses_the_disc() -> None:
    rec, ref = image_pair(5, (128, 128))
    roi = disc_mask(128)
    value_psnr, value_ssim = roi_psnr_ssim(rec, ref)
    assert value_psnr == psnr(rec, ref, roi)
    assert value_ssim == ssim(rec, ref, roi)
    # simulated reconstructions are grey outside the disc; that must not move the scores
    grey = np.where(roi, rec, 0.5)
    assert roi_psnr_ssim(grey, ref)[0] == pytest.approx(value_psnr, abs=1e-12)
    assert psnr(grey, ref) != pytest.approx(value_psnr, abs=0.1)
    with pytest.raises(ValueError, match="square"):
        roi_psnr_ssim(rec[:, :100], ref[:, :100])


@pytest.mark.parametrize(
    ("rec", "ref", "mask", "message"),
    [
        (np.zeros((8, 8, 1)), np.zeros((8, 8, 1)), None, "2-D"),
        (np.zeros((8, 8)), np.zeros((8, 9)), None, "shapes differ"),
        (np.full((8, 8), np.nan), np.zeros((8, 8)), None, "NaN or infinite"),
        (np.zeros((8, 8)), np.full((8, 8), np.inf), None, "NaN or infinite"),
        (np.zeros((8, 8), dtype=complex), np.zeros((8, 8)), None, "dtype complex"),
        (np.zeros((8, 8)), np.zeros((8, 8)), np.ones((8, 8)), "boolean"),
        (np.zeros((8, 8)), np.zeros((8, 8)), np.ones((8, 7), dtype=bool), "mask shape"),
        (np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 8), dtype=bool), "no pixels"),
    ],
)
def test_psnr_and_ssim_reject_bad_input(rec, ref, mask, message) -> None:
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match=message):
            metric(rec, ref, mask)


def test_psnr_and_ssim_reject_bad_data_range_and_border_only_mask() -> None:
    image = np.zeros((16, 16))
    with pytest.raises(ValueError, match="data_range"):
        psnr(image, image, data_range=0.0)
    border_only = np.zeros((16, 16), dtype=bool)
    border_only[:3, :] = True
    assert psnr(image + 0.1, image, border_only) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="border"):
        ssim(image, image, border_only)


# --------------------------------------------------------------------------------- Dice


def random_labels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    labels = rng.integers(0, 3, size=shape)
    assert set(np.unique(labels)) == {0, 1, 2}
    return labels


def test_dice_matches_monai_on_a_batch_of_slices() -> None:
    rng = np.random.default_rng(0)
    prediction = random_labels(rng, (4, 32, 40))
    reference = np.where(rng.random((4, 32, 40)) < 0.7, prediction, random_labels(rng, (4, 32, 40)))
    monai_scores = compute_dice(one_hot(prediction), one_hot(reference), include_background=False)
    assert monai_scores.shape == (4, 2)
    for index in range(4):
        ours = dice_per_class(prediction[index], reference[index])
        assert list(ours) == [LABEL_LIVER, LABEL_TUMOR]
        assert [ours[LABEL_LIVER], ours[LABEL_TUMOR]] == pytest.approx(
            monai_scores[index].tolist(), abs=1e-6
        )
        assert 0.3 < ours[LABEL_LIVER] < 1.0
    metric = DiceMetric(include_background=False, reduction="mean")
    metric(one_hot(prediction), one_hot(reference))
    slice_means = [mean_dice(p, r) for p, r in zip(prediction, reference)]
    assert np.mean(slice_means) == pytest.approx(metric.aggregate().item(), abs=1e-6)


def test_dice_matches_monai_on_a_volume() -> None:
    rng = np.random.default_rng(1)
    prediction = random_labels(rng, (24, 20, 6))
    reference = np.where(rng.random(prediction.shape) < 0.5, prediction, random_labels(rng, (24, 20, 6)))
    monai_scores = compute_dice(
        one_hot(prediction[None]), one_hot(reference[None]), include_background=False
    )[0]
    ours = dice_per_class(prediction, reference)
    assert [ours[1], ours[2]] == pytest.approx(monai_scores.tolist(), abs=1e-6)
    assert mean_dice(prediction, reference) == pytest.approx(monai_scores.mean().item(), abs=1e-6)


def test_dice_known_overlap_of_two_squares() -> None:
    prediction = np.zeros((20, 20), dtype=np.uint8)
    reference = np.zeros((20, 20), dtype=np.uint8)
    prediction[0:10, 0:10] = LABEL_LIVER
    reference[5:15, 5:15] = LABEL_LIVER
    prediction[18:20, 18:20] = LABEL_TUMOR  # tumour predicted where there is none
    scores = dice_per_class(prediction, reference)
    assert scores == {LABEL_LIVER: pytest.approx(2 * 25 / 200), LABEL_TUMOR: 0.0}
    assert mean_dice(prediction, reference) == pytest.approx((0.25 + 0.0) / 2)
    # background is excluded: including it would raise the mean
    assert mean_dice(prediction, reference, labels=(0, 1, 2)) > mean_dice(prediction, reference)


def test_dice_empty_class_conventions() -> None:
    reference = np.zeros((16, 16), dtype=np.int64)
    reference[4:8, 4:8] = LABEL_LIVER
    # tumour absent from both: eq. 7 gives epsilon / epsilon = 1; MONAI agrees (ignore_empty=False)
    scores = dice_per_class(reference, reference)
    assert scores == {LABEL_LIVER: 1.0, LABEL_TUMOR: 1.0}
    assert mean_dice(reference, reference) == 1.0
    monai_scores = compute_dice(
        one_hot(reference[None]), one_hot(reference[None]), include_background=False, ignore_empty=False
    )
    assert monai_scores[0].tolist() == [1.0, 1.0]
    # liver missed entirely: 0
    empty = np.zeros_like(reference)
    assert dice_per_class(empty, reference) == {LABEL_LIVER: 0.0, LABEL_TUMOR: 1.0}
    assert mean_dice(empty, reference) == 0.5
    assert DICE_LABELS == (LABEL_LIVER, LABEL_TUMOR)


def test_dice_accepts_whole_number_floats_and_bools() -> None:
    reference = np.zeros((8, 8), dtype=np.int16)
    reference[2:6, 2:6] = 1
    assert mean_dice(reference.astype(np.float32), reference, labels=(1,)) == 1.0
    assert dice_per_class(reference.astype(bool), reference, labels=[1]) == {1: 1.0}


@pytest.mark.parametrize(
    ("prediction", "reference", "message"),
    [
        (np.zeros((8, 8), int), np.zeros((8, 9), int), "shapes differ"),
        (np.zeros((8, 8)), np.full((8, 8), np.nan), "contains NaN"),
        (np.full((8, 8), 0.5), np.zeros((8, 8), int), "non-integral"),
        (np.zeros((8, 8), dtype=complex), np.zeros((8, 8), int), "dtype complex"),
        (np.array([["a"]]), np.zeros((1, 1), int), "dtype <U1"),
        (np.zeros((0, 8), int), np.zeros((0, 8), int), "empty"),
    ],
)
def test_dice_rejects_bad_input(prediction, reference, message) -> None:
    with pytest.raises(ValueError, match=message):
        dice_per_class(prediction, reference)
    with pytest.raises(ValueError, match=message):
        mean_dice(prediction, reference)


@pytest.mark.parametrize("labels", [(), (1, 1), (1.5,), (True,)])
def test_dice_rejects_bad_labels(labels) -> None:
    with pytest.raises(ValueError, match="labels"):
        dice_per_class(np.zeros((4, 4), int), np.zeros((4, 4), int), labels)


def _three_slices() -> tuple[np.ndarray, np.ndarray]:
    """Slice 0: liver half found, no tumour anywhere; slice 1: liver exact, tumour missed;
    slice 2: nothing in either map."""
    prediction = np.zeros((3, 8, 8), int)
    reference = np.zeros((3, 8, 8), int)
    reference[0, :4, :4] = LABEL_LIVER
    prediction[0, :4, :2] = LABEL_LIVER
    reference[1, :2, :2] = LABEL_TUMOR
    reference[1, 4:, 4:] = LABEL_LIVER
    prediction[1, 4:, 4:] = LABEL_LIVER
    return prediction, reference


def test_dice_conventions_on_known_slices() -> None:
    prediction, reference = _three_slices()
    counts = dice_counts(prediction, reference, batch=True)
    assert counts.shape == (3, 2, 3)
    assert counts[0].tolist() == [[8, 8, 16], [0, 0, 0]]
    assert counts[1].tolist() == [[16, 16, 16], [0, 0, 4]]
    # (a) eq. 7: absent from both scores 1, so the empty slice is perfect
    per_class, mean = dice_scores(counts, "slice_eq7")
    np.testing.assert_allclose(per_class, [[2 / 3, 1.0], [1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(mean, [5 / 6, 0.5, 1.0])
    # (b) absent from both is not counted: slice 0 is its liver alone, slice 2 is not scored
    per_class, mean = dice_scores(counts, "slice_present")
    np.testing.assert_allclose(per_class, [[2 / 3, np.nan], [1.0, 0.0], [np.nan, np.nan]])
    np.testing.assert_allclose(mean, [2 / 3, 0.5, np.nan])
    # (c) per volume: slices 0-1 are patient "a", slice 2 patient "b" (nothing to score)
    per_class, mean = dice_scores(counts, "volume", cases=["a", "a", "b"])
    np.testing.assert_allclose(per_class, [[2 * 24 / 56, 0.0], [np.nan, np.nan]])
    np.testing.assert_allclose(mean, [24 / 56, np.nan])
    assert DICE_CONVENTIONS == ("slice_eq7", "slice_present", "volume")


def test_volume_dice_is_the_dice_of_the_stacked_volume_and_matches_monai() -> None:
    rng = np.random.default_rng(3)
    prediction = random_labels(rng, (5, 16, 12))
    reference = np.where(rng.random(prediction.shape) < 0.6, prediction, random_labels(rng, prediction.shape))
    counts = dice_counts(prediction, reference, batch=True)
    np.testing.assert_array_equal(counts.sum(axis=0), dice_counts(prediction, reference))
    per_class, mean = dice_scores(counts, "volume", cases=["p"] * 5)
    whole = dice_per_class(prediction, reference)
    np.testing.assert_allclose(per_class[0], [whole[LABEL_LIVER], whole[LABEL_TUMOR]])
    monai = compute_dice(one_hot(prediction.transpose(1, 2, 0)[None]), one_hot(reference.transpose(1, 2, 0)[None]),
                         include_background=False)[0]
    np.testing.assert_allclose(per_class[0], monai.numpy(), atol=1e-6)
    # per slice, (a) and (b) agree wherever every class is present
    a = dice_scores(counts, "slice_eq7")[1]
    b = dice_scores(counts, "slice_present")[1]
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, [mean_dice(p, r) for p, r in zip(prediction, reference)])


def test_dice_from_counts_and_conventions_reject_bad_input() -> None:
    assert dice_from_counts(np.array([0, 0, 0]), absent=1.0) == 1.0
    assert np.isnan(dice_from_counts(np.array([0, 0, 0]), absent=math.nan))
    assert dice_from_counts(np.array([0, 5, 0]), absent=1.0) == 0.0  # a false positive only
    with pytest.raises(ValueError, match="axis of 3"):
        dice_from_counts(np.zeros((2, 2)), absent=1.0)
    with pytest.raises(ValueError, match="unknown Dice convention 'lits'"):
        dice_scores(np.zeros((1, 2, 3)), "lits")
    with pytest.raises(ValueError, match="needs the case of every slice"):
        dice_scores(np.zeros((2, 2, 3)), "volume", cases=["a"])
