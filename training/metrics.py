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
* Dice is eq. 7 of the paper in the limit of a vanishing smoothing ``epsilon``, per class,
  over liver (1) and tumour (2) only: the background is excluded because it dominates every
  slice and would inflate the scores of poor models.

All functions take numpy arrays and return Python floats (or a dict of floats).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.metrics import structural_similarity

from training.physics import disc_mask
from training.volume import LABEL_LIVER, LABEL_TUMOR

SSIM_WIN_SIZE = 7
"""Side of scikit-image's default uniform SSIM window, pixels."""
DICE_LABELS = (LABEL_LIVER, LABEL_TUMOR)
"""Classes the paper averages Dice over (background excluded)."""

__all__ = [
    "DICE_LABELS",
    "SSIM_WIN_SIZE",
    "dice_per_class",
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


def dice_per_class(
    prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int] = DICE_LABELS
) -> dict[int, float]:
    """Dice coefficient of each class in ``labels``: ``2 |P & G| / (|P| + |G|)``.

    This is the per-class term of the paper's eq. 7 on hard (one-hot) label maps in the limit
    ``epsilon -> 0``. When a class is absent from both maps the term is ``epsilon / epsilon =
    1``: an empty prediction of an empty class is correct. A class present in only one of the
    maps scores 0.

    Args:
        prediction: integer label map, e.g. ``(H, W)`` slice or ``(H, W, D)`` volume, with
            0 background, 1 liver, 2 tumour. Float arrays are accepted when their values
            are whole numbers.
        reference: ground truth label map of the same shape.
        labels: the classes to score; by default liver and tumour (background excluded).

    Returns:
        ``{label: dice}`` in the order of ``labels``, each in [0, 1].

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
    scores: dict[int, float] = {}
    for label in map(int, labels):
        predicted = prediction == label
        expected = reference == label
        total = np.count_nonzero(predicted) + np.count_nonzero(expected)
        overlap = np.count_nonzero(predicted & expected)
        scores[label] = 1.0 if total == 0 else 2.0 * overlap / total
    return scores


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
