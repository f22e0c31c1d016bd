"""Evaluation metrics: PSNR and SSIM of reconstructions, Dice of segmentations.

Conventions (paper §3.2, DESIGN.md "Physics"):

* Images are 2-D ``(H, W)`` arrays of the normalised attenuation ``x`` (unitless, nominally
  in [0, 1]); PSNR and SSIM therefore use a data range of 1, as dival / LoDoPaB do.
* The simulated reconstructions are defined only on the centred inscribed disc, so the
  project's reported PSNR / SSIM (:func:`roi_psnr_ssim`) are computed inside that disc
  (radius 256 on 512 x 512 slices); outside it the images carry no information.
* SSIM is scikit-image's: 7 x 7 uniform window, sample covariance, ``K1 = 0.01``,
  ``K2 = 0.03``, i.e. the settings dival uses to evaluate LoDoPaB. A masked SSIM is the mean
  of the local SSIM map over the mask pixels whose window lies inside the image.
* Dice is scored over liver (1) and tumour (2) only: the background is excluded because it
  dominates every slice and would inflate the scores of poor models. Everything derives from
  one count, :func:`dice_counts` (overlap, predicted and reference pixels per class), under
  three named conventions (:data:`DICE_CONVENTIONS`) that differ only in what they average
  over and in what a class absent from both maps counts for:

  - ``slice_eq7`` (a): per slice, eq. 7 of the paper as epsilon -> 0, so a class absent from
    both maps scores epsilon / epsilon = 1 (a segmenter that finds no tumour on a tumour-free
    slice is right);
  - ``slice_present`` (b): per slice, over the classes present in the reference or the
    prediction only; a class absent from both is not counted (NaN), nor is a slice where both
    classes are;
  - ``volume`` (c): per patient, the counts of all its slices summed before the ratio (the
    LiTS challenge's "Dice per case"); a class absent from the whole volume and its
    prediction is not counted.

All functions take numpy arrays and return Python floats (or a dict of floats).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from skimage.metrics import structural_similarity

from training.physics import disc_mask
from training.volume import LABEL_LIVER, LABEL_TUMOR

SSIM_WIN_SIZE = 7
"""Side of scikit-image's default uniform SSIM window, pixels."""
DICE_LABELS = (LABEL_LIVER, LABEL_TUMOR)
"""Classes the paper averages Dice over (background excluded)."""

DICE_CONVENTIONS = ("slice_eq7", "slice_present", "volume")
"""The named Dice conventions, (a), (b) and (c) of the module docstring."""

__all__ = [
    "DICE_CONVENTIONS",
    "DICE_LABELS",
    "SSIM_WIN_SIZE",
    "dice_counts",
    "dice_from_counts",
    "dice_per_class",
    "dice_scores",
    "mean_dice",
    "psnr",
    "roi_psnr_ssim",
    "ssim",
]


def _check_image_pair(
    reconstruction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None, data_range: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate a (reconstruction, reference, mask) triple and return float64 images."""
    reconstruction = np.asarray(reconstruction)
    reference = np.asarray(reference)
    for name, image in (("reconstruction", reconstruction), ("reference", reference)):
        if image.ndim != 2:
            raise ValueError(f"{name} must be a 2-D (H, W) image, got shape {image.shape}")
        if image.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be a real numeric array, got dtype {image.dtype}")
        if not np.all(np.isfinite(image)):
            raise ValueError(f"{name} contains NaN or infinite values")
    if reconstruction.shape != reference.shape:
        raise ValueError(
            "reconstruction and reference shapes differ: "
            f"{reconstruction.shape} vs {reference.shape}"
        )
    if not (np.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise ValueError(f"mask must be a boolean array, got dtype {mask.dtype}")
        if mask.shape != reference.shape:
            raise ValueError(
                f"mask shape {mask.shape} differs from the image shape {reference.shape}"
            )
        if not mask.any():
            raise ValueError("mask selects no pixels")
    return reconstruction.astype(np.float64), reference.astype(np.float64), mask


def psnr(
    reconstruction: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float = 1.0,
) -> float:
    """Peak signal-to-noise ratio in dB over the pixels selected by ``mask``.

    ``10 * log10(data_range**2 / MSE)``, with the mean squared error taken over the mask
    pixels (all pixels when ``mask`` is ``None``), in float64.

    Args:
        reconstruction: ``(H, W)`` image under test, finite.
        reference: ``(H, W)`` ground truth (full-dose) image, finite.
        mask: optional boolean ``(H, W)`` region of interest; must select at least one pixel.
        data_range: the peak signal, in image units (1 for the normalised attenuation ``x``).
            It is fixed rather than taken from the reference so that scores of different
            slices and methods are comparable.

    Returns:
        PSNR in dB; ``inf`` when the images agree exactly on the region.

    Raises:
        ValueError: for non-2-D, mismatched or non-finite images, a non-boolean, mismatched
            or empty mask, or a non-positive ``data_range``.
    """
    rec, ref, mask = _check_image_pair(reconstruction, reference, mask, data_range)
    error = rec - ref if mask is None else rec[mask] - ref[mask]
    mse = float(np.mean(np.square(error)))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim(
    reconstruction: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float = 1.0,
) -> float:
    """Mean structural similarity over the pixels selected by ``mask``.

    The local SSIM map is scikit-image's ``structural_similarity(..., full=True)`` with its
    defaults (7 x 7 uniform window, sample covariance). scikit-image averages the map after
    cropping a border of ``(SSIM_WIN_SIZE - 1) // 2 = 3`` pixels, where the window leaves the
    image; the masked mean likewise uses only mask pixels outside that border. With
    ``mask=None`` the result is exactly scikit-image's mean SSIM.

    Args:
        reconstruction: ``(H, W)`` image under test, finite, at least 7 x 7.
        reference: ``(H, W)`` ground truth image, finite.
        mask: optional boolean ``(H, W)`` region of interest; it must select at least one
            pixel at least 3 pixels away from the image border.
        data_range: dynamic range of the images (1 for the normalised attenuation ``x``);
            it sets the stabilising constants ``C1 = (0.01 * data_range)**2`` and
            ``C2 = (0.03 * data_range)**2``.

    Returns:
        Mean SSIM, at most 1 (1 for identical images).

    Raises:
        ValueError: as :func:`psnr`, when the images are smaller than the window, or when the
            mask selects only border pixels.
    """
    rec, ref, mask = _check_image_pair(reconstruction, reference, mask, data_range)
    mean_ssim, ssim_map = structural_similarity(
        ref, rec, win_size=SSIM_WIN_SIZE, data_range=data_range, full=True
    )
    if mask is None:
        return float(mean_ssim)
    border = (SSIM_WIN_SIZE - 1) // 2
    interior = np.zeros_like(mask)
    interior[border:-border, border:-border] = True
    selected = mask & interior
    if not selected.any():
        raise ValueError(
            f"mask selects no pixel at least {border} pixels from the image border, "
            "where the SSIM window lies inside the image"
        )
    return float(np.mean(ssim_map[selected], dtype=np.float64))


def roi_psnr_ssim(reconstruction: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """The project's reported image metrics: PSNR (dB) and SSIM inside the centred disc.

    The ROI is :func:`training.physics.disc_mask` of the slice size (radius ``N / 2``, i.e.
    256 on 512 x 512, as in the paper), the only region on which the simulated
    reconstructions are defined; the data range is 1 (normalised attenuation ``x``).

    Args:
        reconstruction: square ``(N, N)`` image under test.
        reference: square ``(N, N)`` ground truth (full-dose) image.

    Returns:
        ``(psnr_db, ssim)``.

    Raises:
        ValueError: for non-square images, and as :func:`psnr` / :func:`ssim`.
    """
    shape = np.shape(reference)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"the disc ROI needs a square (N, N) reference image, got shape {shape}")
    roi = disc_mask(shape[0])
    return psnr(reconstruction, reference, roi), ssim(reconstruction, reference, roi)


def _check_label_map(name: str, labels: np.ndarray) -> np.ndarray:
    """Validate an integer label map and return it as int64."""
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError(f"{name} is empty (shape {labels.shape})")
    if labels.dtype.kind in "biu":
        return labels.astype(np.int64)
    if labels.dtype.kind != "f":
        raise ValueError(f"{name} must be an integer label map, got dtype {labels.dtype}")
    if np.isnan(labels).any():
        raise ValueError(f"{name} (dtype {labels.dtype}) contains NaN")
    if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
        raise ValueError(
            f"{name} (dtype {labels.dtype}) has non-finite or non-integral values; "
            "expected class labels"
        )
    return labels.astype(np.int64)


def _check_labels_argument(labels: Sequence[int]) -> tuple[int, ...]:
    labels = tuple(labels)
    if (
        not labels
        or len(set(labels)) != len(labels)
        or not all(
            isinstance(label, (int, np.integer)) and not isinstance(label, bool) for label in labels
        )
    ):
        raise ValueError(
            f"labels must be a non-empty sequence of distinct integer class labels, got {labels}"
        )
    return tuple(map(int, labels))


def dice_counts(
    prediction: np.ndarray,
    reference: np.ndarray,
    labels: Sequence[int] = DICE_LABELS,
    batch: bool = False,
) -> np.ndarray:
    """Pixel counts behind every Dice score: ``[|P & G|, |P|, |G|]`` of each class.

    Args:
        prediction: integer label map, e.g. ``(H, W)`` slice or ``(H, W, D)`` volume, with
            0 background, 1 liver, 2 tumour; with ``batch=True`` a ``(B, ...)`` stack of maps.
            Float arrays are accepted when their values are whole numbers.
        reference: ground truth label map of the same shape.
        labels: the classes to count; by default liver and tumour (background excluded).
        batch: count each map of the leading axis separately.

    Returns:
        int64 counts ``(len(labels), 3)``, or ``(B, len(labels), 3)`` with ``batch=True``.
        Counts add up: the counts of a volume are the sum of its slices' counts.

    Raises:
        ValueError: for mismatched shapes, empty maps, non-integer dtypes, NaN or
            non-integral values, or an empty or repeated ``labels``.
    """
    prediction = _check_label_map("prediction", prediction)
    reference = _check_label_map("reference", reference)
    if prediction.shape != reference.shape:
        raise ValueError(
            f"prediction and reference shapes differ: {prediction.shape} vs {reference.shape}"
        )
    labels = _check_labels_argument(labels)
    if batch and prediction.ndim < 2:
        raise ValueError(f"a batch of label maps needs at least 2 dimensions, got shape {prediction.shape}")
    axes = tuple(range(1 if batch else 0, prediction.ndim))
    counts = []
    for label in labels:
        predicted = prediction == label
        expected = reference == label
        counts.append(
            np.stack(
                [
                    np.count_nonzero(predicted & expected, axis=axes),
                    np.count_nonzero(predicted, axis=axes),
                    np.count_nonzero(expected, axis=axes),
                ],
                axis=-1,
            )
        )
    return np.stack(counts, axis=-2).astype(np.int64)


def dice_from_counts(counts: np.ndarray, absent: float) -> np.ndarray:
    """Dice ``2 |P & G| / (|P| + |G|)`` of each class from :func:`dice_counts`'s counts.

    Args:
        counts: ``(..., 3)`` counts (overlap, predicted, reference); sum them over slices
            first for a per-volume score.
        absent: the value of a class absent from both maps: 1.0 for eq. 7 (``slice_eq7``),
            NaN for "not counted" (``slice_present``, ``volume``).

    Returns:
        float64 ``counts.shape[:-1]`` scores in [0, 1] (or ``absent``).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape[-1:] != (3,):
        raise ValueError(f"counts must end in an axis of 3 (overlap, predicted, reference), got shape {counts.shape}")
    total = counts[..., 1] + counts[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * counts[..., 0] / total, absent)


def dice_scores(counts: np.ndarray, convention: str, cases: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dice of each scored item under one of :data:`DICE_CONVENTIONS`.

    Args:
        counts: ``(N, C, 3)`` per-slice counts from :func:`dice_counts` (``batch=True``).
        convention: ``slice_eq7``, ``slice_present`` (items are the N slices) or ``volume``
            (items are the patients: the slices' counts summed per case).
        cases: the patient of each slice; needed for ``volume``.

    Returns:
        ``(per_class (M, C), mean (M,))``: the Dice of each class of each item (NaN: not
        counted) and each item's mean over its counted classes (NaN when none is). Items are
        slices, or the patients in order of first appearance.
    """
    counts = np.asarray(counts)
    if counts.ndim != 3 or counts.shape[-1] != 3:
        raise ValueError(f"counts must be (slices, classes, 3), got shape {counts.shape}")
    if convention == "slice_eq7":
        per_class = dice_from_counts(counts, absent=1.0)
    elif convention == "slice_present":
        per_class = dice_from_counts(counts, absent=math.nan)
    elif convention == "volume":
        if cases is None or len(cases) != counts.shape[0]:
            raise ValueError("the volume convention needs the case of every slice")
        order = list(dict.fromkeys(cases))
        index = np.array([order.index(c) for c in cases])
        summed = np.zeros((len(order),) + counts.shape[1:], dtype=np.int64)
        np.add.at(summed, index, counts)
        per_class = dice_from_counts(summed, absent=math.nan)
    else:
        raise ValueError(f"unknown Dice convention {convention!r}; choose from {DICE_CONVENTIONS}")
    counted = ~np.isnan(per_class)
    with np.errstate(invalid="ignore"):
        mean = np.where(counted.any(axis=1), np.nansum(per_class, axis=1) / np.maximum(counted.sum(axis=1), 1), math.nan)
    return per_class, mean


def dice_per_class(
    prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int] = DICE_LABELS
) -> dict[int, float]:
    """Dice coefficient of each class in ``labels`` under eq. 7 (convention ``slice_eq7``).

    ``2 |P & G| / (|P| + |G|)``, the per-class term of the paper's eq. 7 on hard (one-hot)
    label maps in the limit ``epsilon -> 0``. When a class is absent from both maps the term
    is ``epsilon / epsilon = 1``: an empty prediction of an empty class is correct. A class
    present in only one of the maps scores 0.

    Args:
        prediction: integer label map, e.g. ``(H, W)`` slice or ``(H, W, D)`` volume (see
            :func:`dice_counts`).
        reference: ground truth label map of the same shape.
        labels: the classes to score; by default liver and tumour (background excluded).

    Returns:
        ``{label: dice}`` in the order of ``labels``, each in [0, 1].

    Raises:
        ValueError: as :func:`dice_counts`.
    """
    labels = _check_labels_argument(labels)
    scores = dice_from_counts(dice_counts(prediction, reference, labels), absent=1.0)
    return {label: float(score) for label, score in zip(labels, scores)}


def mean_dice(
    prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int] = DICE_LABELS
) -> float:
    """Mean of :func:`dice_per_class` over ``labels`` (liver and tumour by default), eq. 7.

    Args:
        prediction: integer label map (see :func:`dice_per_class`).
        reference: ground truth label map of the same shape.
        labels: the classes to average over; background is excluded by default, as in the
            paper.

    Returns:
        Mean Dice in [0, 1].
    """
    return float(np.mean(list(dice_per_class(prediction, reference, labels).values())))
