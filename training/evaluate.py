"""Evaluation and report (``tact evaluate``): the paper's Tables I-II and Figs. 3-4 for a data set.

Writes, into the report folder:

* ``metrics.csv``: one row per method and slice: ``method,case,slice,psnr,ssim,rmse_hu``
  (ROI PSNR in dB and SSIM on the normalised image with data range 1; RMSE against the full
  dose inside the ROI, in HU), then, with a segmenter, the Dice of its map of the method's
  image against the reference labels under the two per-slice conventions
  (``dice_slice_eq7_liver``, ``..._tumour``, ``dice_slice_eq7``; ``dice_slice_present_*``,
  empty where a class is not counted) and the pixel counts they derive from
  (``liver_overlap``, ``liver_predicted``, ``liver_reference``, ``tumour_*``);
* ``dice_volume.csv`` (with a segmenter): the per-volume Dice of each method and patient;
* ``table_reconstruction.md``: mean ± std per method, in the form of the paper's Table I;
* ``table_dice.md`` (with a segmenter): Dice per method under the three named conventions
  side by side, liver and tumour separately (the paper's Table II), with the score of an
  empty map as a reference row;
* ``figures/``: Fig. 3-style panels (low-dose, each method, full dose, with per-image PSNR
  and SSIM), with a segmenter Fig. 4-style panels (each image with g's predicted map
  overlaid, and the reference map), and box plots of the metrics per method.

Dice follows the paper (§3.2): the frozen segmenter g, pre-trained on full-dose scans, is
applied to every method's image, full dose included, and only the liver and tumour classes
are scored. The conventions (:data:`training.metrics.DICE_CONVENTIONS`) differ in what
they average over and in what a class absent from both maps counts for: (a) per slice as
eq. 7 (absent = 1), (b) per slice over the classes present (absent = not counted), (c) per
volume (counts summed over a patient's slices, the LiTS convention).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from training.dataset import FULLDOSE, LOWDOSE, SimulatedDataset, SliceRef, worker_dataset
from training.errors import DataError
from training.fileio import atomic_path
from training.methods import BASELINES, is_known_method, method_label
from training.metrics import DICE_LABELS, dice_counts, dice_scores, roi_psnr_ssim
from training.parallel import process_pool
from training.physics import disc_mask, hu_per_normalized_unit
from training.volume import LABEL_LIVER, LABEL_TUMOR

# torch and MONAI (training.inference, training.checkpoints) take seconds to import; they
# are imported where they are used, so that the pool's workers, which import this module
# for _evaluate_slice, start quickly.
if TYPE_CHECKING:
    import torch
    from torch import nn

    from training.checkpoints import ModelFile

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("lowdose", "fbp", "bm3d", "fulldose")
SOFT_TISSUE_WINDOW_HU = (40.0, 400.0)
"""(level, width) of the display window."""
SEGMENTATION_COLOURS = {LABEL_LIVER: (0.0, 0.85, 0.0), LABEL_TUMOR: (0.95, 0.0, 0.0)}
"""Overlay colours of the predicted maps (RGB): liver green, tumour red, as in the paper's Fig. 4."""
OVERLAY_ALPHA = 0.45


DiceCounts = tuple[tuple[int, int, int], ...]
"""Per class (liver, tumour): pixels in both maps, in the prediction, in the reference."""

COUNT_COLUMNS = tuple(f"{name}_{part}" for name in ("liver", "tumour") for part in ("overlap", "predicted", "reference"))
"""The ``metrics.csv`` columns of :attr:`SliceMetrics.dice_counts`."""
SLICE_CONVENTIONS = ("slice_eq7", "slice_present")
CONVENTION_LABELS = {
    "slice_eq7": "(a) per slice, eq. 7",
    "slice_present": "(b) per slice, present classes",
    "volume": "(c) per volume",
}


@dataclass(frozen=True)
class SliceMetrics:
    """Quality of one method on one slice.

    ``psnr`` (dB), ``ssim`` and ``rmse_hu`` (HU) against the full dose inside the disc ROI;
    ``dice_counts`` compare the segmenter's map of the method's image with the reference
    labels (``None`` when no segmenter was given), and every Dice score derives from them.
    """

    method: str
    case: str
    slice: int
    psnr: float
    ssim: float
    rmse_hu: float
    dice_counts: DiceCounts | None = None

    @property
    def has_dice(self) -> bool:
        return self.dice_counts is not None

    def dice(self, convention: str) -> tuple[float, float, float]:
        """``(liver, tumour, mean)`` Dice of this slice under a per-slice convention (NaN: not counted or not measured)."""
        if convention not in SLICE_CONVENTIONS:
            raise ValueError(f"a slice has Dice under {SLICE_CONVENTIONS}, not {convention!r}")
        if self.dice_counts is None:
            return math.nan, math.nan, math.nan
        per_class, mean = dice_scores(np.asarray([self.dice_counts]), convention)
        return float(per_class[0, 0]), float(per_class[0, 1]), float(mean[0])


@dataclass(frozen=True)
class _Job:
    root: str
    ref: SliceRef
    methods: tuple[str, ...]


def _evaluate_slice(job: _Job) -> list[SliceMetrics]:
    dataset = worker_dataset(job.root)
    reference = dataset.slice(FULLDOSE, job.ref)
    roi = disc_mask(reference.shape[0])
    rows = []
    for method in job.methods:
        image = dataset.slice(method, job.ref)
        psnr, ssim = roi_psnr_ssim(image, reference)
        rmse_hu = float(np.sqrt(np.mean((image[roi] - reference[roi]) ** 2)) * hu_per_normalized_unit())
        rows.append(SliceMetrics(method, job.ref.case, job.ref.index, psnr, ssim, rmse_hu))
    return rows


def _missing_hint(method: str) -> str:
    if method in BASELINES:
        return f"run `tact baseline {method}` first"
    if method in (FULLDOSE, LOWDOSE):
        return "re-run `tact simulate`"
    return "run `tact reconstruct` with the model's best.pt first (an interrupted run is not counted)"


def evaluate_dataset(
    dataset: SimulatedDataset,
    methods: Sequence[str] = DEFAULT_METHODS,
    out: str | Path = "report",
    split: str = "test",
    figures: int = 2,
    workers: int | None = None,
    progress: bool = True,
    segmenter: str | Path | None = None,
    device: str | torch.device | None = None,
) -> list[SliceMetrics]:
    """Measure ``methods`` on every slice of ``split`` and write the report into ``out``.

    Args:
        dataset: the simulated data set.
        methods: ``lowdose``, ``fbp``, ``bm3d``, ``fulldose`` and trained reconstructors
            written by :func:`training.inference.reconstruct_dataset` (``baseunet``,
            ``ta0.5``, ``joint0.9``, ...), in table order.
        out: the report folder.
        split: ``test`` (the paper's), ``train`` or ``all``.
        figures: number of example slices drawn (Fig. 3, and Fig. 4 with a segmenter).
        workers: processes for PSNR / SSIM (default: every core).
        progress: show progress bars.
        segmenter: a ``segmentation`` model file (the pre-trained g): adds Dice to every
            row, ``table_dice.md`` and the segmentation figures.
        device: where g runs (default: the first GPU where there is one).

    Returns:
        one row per method and slice, as written to ``metrics.csv``.

    Raises:
        ValueError: an unknown method name.
        DataError: a method not computed for the data set, an empty split, or a segmenter
            file that holds no segmentation network or cannot take the data set's slices.
    """
    from training.inference import default_device

    methods = tuple(dict.fromkeys(methods))
    unknown = [m for m in methods if not is_known_method(m)]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(DEFAULT_METHODS)} or a trained "
                         "reconstructor: baseunet, ta<alpha> (e.g. ta0.5), joint<C> (e.g. joint0.9)")
    missing = [m for m in methods if not dataset.has_method(m)]
    if missing:
        raise DataError(dataset.root, f"method(s) {missing} not computed for this data set; {_missing_hint(missing[0])}")
    refs = dataset.slices(split)
    if not refs:
        raise DataError(dataset.root, f"the {split!r} split holds no slices (splits: {dataset.manifest['split']})")
    g, g_file = (None, None) if segmenter is None else _load_evaluation_segmenter(segmenter, dataset)
    out = Path(out)
    figure_refs = pick_figure_slices(dataset, refs, figures)
    jobs = [_Job(str(dataset.root), ref, methods) for ref in refs]
    run_on = default_device(device)

    def segment() -> tuple[dict, dict]:
        return ({}, {}) if g is None else segment_and_score(dataset, refs, methods, g, run_on, set(figure_refs), progress)

    # On a GPU, g runs here while the pool computes PSNR / SSIM; on the CPU it waits for the
    # pool, since torch's threads and the workers competing for the same cores slow both
    # down several times over.
    overlap = run_on.type != "cpu"
    with process_pool(workers) as pool:
        pending = pool.imap(_evaluate_slice, jobs)
        if overlap:
            dice, predictions = segment()
        per_slice = list(tqdm(pending, total=len(jobs), desc="evaluate", unit="slice", disable=not progress))
    if not overlap:
        dice, predictions = segment()
    rows = [row for slice_rows in per_slice for row in slice_rows]
    if g is not None:
        rows = [dataclasses.replace(r, dice_counts=dice[r.method, SliceRef(r.case, r.slice)]) for r in rows]
    write_metrics_csv(out / "metrics.csv", rows)
    if g is not None:
        write_volume_dice_csv(out / "dice_volume.csv", rows, methods)
    provenance = _provenance(dataset, split)
    with atomic_path(out / "table_reconstruction.md") as tmp:
        tmp.write_text(reconstruction_table(rows, methods, provenance))
    if g_file is not None:
        with atomic_path(out / "table_dice.md") as tmp:
            tmp.write_text(dice_table(rows, methods, f"{provenance}\n{segmenter_provenance(g_file)}"))
    for ref in figure_refs:
        metrics = {r.method: r for r in rows if r.case == ref.case and r.slice == ref.index}
        name = f"{ref.case}_{ref.index:03d}.png"
        plot_reconstructions(dataset, ref, methods, metrics, out / "figures" / f"reconstructions_{name}")
        if g is not None:
            maps = {m: predictions[m, ref] for m in methods}
            plot_segmentations(dataset, ref, methods, metrics, maps, out / "figures" / f"segmentations_{name}")
    plot_metric_distributions(rows, methods, out / "figures" / "metrics_boxplot.png")
    count = len(figure_refs) * (2 if g is not None else 1) + 1
    log.info("wrote %s (%d slices, %d methods, %d figures)", out, len(refs), len(methods), count)
    return rows


def _load_evaluation_segmenter(path: str | Path, dataset: SimulatedDataset) -> tuple[nn.Module, ModelFile]:
    """g (eval mode) and its model file, checked against the data set's slice size before any work."""
    from training.checkpoints import check_input_size, load_segmenter, read_model

    model = read_model(path)
    check_input_size(model, dataset.settings["size"])
    return load_segmenter(model), model


def segment_and_score(
    dataset: SimulatedDataset,
    refs: Sequence[SliceRef],
    methods: Sequence[str],
    segmenter: nn.Module,
    device: str | torch.device | None = None,
    keep: set[SliceRef] | frozenset[SliceRef] = frozenset(),
    progress: bool = False,
    batch_size: int = 16,
) -> tuple[dict[tuple[str, SliceRef], DiceCounts], dict[tuple[str, SliceRef], np.ndarray]]:
    """Apply g to each method's image of each slice and count its map against the reference labels.

    Returns:
        ``{(method, ref): dice counts}`` (:func:`training.metrics.dice_counts` of liver and
        tumour) for every pair, and g's ``(N, N)`` uint8 label maps for the slices in
        ``keep`` (for the figures).
    """
    from training.inference import segment_images

    counts: dict[tuple[str, SliceRef], DiceCounts] = {}
    maps: dict[tuple[str, SliceRef], np.ndarray] = {}
    with tqdm(total=len(refs) * len(methods), desc="segment", unit="image", disable=not progress) as bar:
        for method in methods:
            for start in range(0, len(refs), batch_size):
                batch = refs[start : start + batch_size]
                images = np.stack([dataset.slice(method, r) for r in batch])
                predicted = segment_images(segmenter, images, batch_size, device)
                references = np.stack([dataset.segmentation(r) for r in batch])
                for ref, labels, slice_counts in zip(batch, predicted, dice_counts(predicted, references, DICE_LABELS, batch=True)):
                    counts[method, ref] = tuple(tuple(int(v) for v in row) for row in slice_counts)
                    if ref in keep:
                        maps[method, ref] = labels
                bar.update(len(batch))
    return counts, maps


def _csv_row(row: SliceMetrics) -> dict[str, object]:
    """A ``metrics.csv`` row: the image metrics, each per-slice Dice convention, and the counts."""
    cells: dict[str, object] = {f.name: getattr(row, f.name) for f in fields(SliceMetrics) if f.name != "dice_counts"}
    for convention in SLICE_CONVENTIONS:
        liver, tumour, mean = row.dice(convention)
        cells.update({f"dice_{convention}_liver": liver, f"dice_{convention}_tumour": tumour, f"dice_{convention}": mean})
    flat = [v for per_class in row.dice_counts for v in per_class] if row.dice_counts is not None else [""] * 6
    cells.update(dict(zip(COUNT_COLUMNS, flat)))
    return cells


def write_metrics_csv(path: str | Path, rows: Sequence[SliceMetrics]) -> None:
    """One CSV row per method and slice, written atomically; a missing (NaN) value is left empty."""
    buffer = io.StringIO()
    records = [_csv_row(row) for row in rows]
    names = list(records[0]) if records else [f.name for f in fields(SliceMetrics)]
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: _cell(v) for k, v in record.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def _cell(value: object) -> object:
    """A CSV cell: floats with 6 decimals, NaN (no value) empty."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"
    return value


def _counts(record: dict[str, str]) -> DiceCounts | None:
    """The Dice counts of a ``metrics.csv`` record, or None (no segmenter, or a report from before counts)."""
    values = [record.get(column) or "" for column in COUNT_COLUMNS]
    if any(v == "" for v in values):
        return None
    numbers = [int(v) for v in values]
    return tuple(tuple(numbers[i : i + 3]) for i in range(0, len(numbers), 3))


def read_metrics_csv(path: str | Path) -> list[SliceMetrics]:
    """The rows of a ``metrics.csv`` (with or without the Dice counts)."""
    with open(path, newline="") as handle:
        return [
            SliceMetrics(r["method"], r["case"], int(r["slice"]), float(r["psnr"]), float(r["ssim"]), float(r["rmse_hu"]),
                         _counts(r))
            for r in csv.DictReader(handle)
        ]


@dataclass(frozen=True)
class VolumeDice:
    """Per-volume Dice (convention (c)) of one method on one patient; NaN where a class is not counted."""

    method: str
    case: str
    slices: int
    liver: float
    tumour: float
    mean: float


def volume_dice(rows: Sequence[SliceMetrics], method: str) -> list[VolumeDice]:
    """The per-volume Dice of ``method`` on each patient of ``rows`` (the slices' counts summed per patient)."""
    mine = [r for r in rows if r.method == method and r.has_dice]
    if not mine:
        return []
    cases = [r.case for r in mine]
    per_class, mean = dice_scores(np.asarray([r.dice_counts for r in mine]), "volume", cases)
    order = list(dict.fromkeys(cases))
    return [VolumeDice(method, case, cases.count(case), float(per_class[i, 0]), float(per_class[i, 1]), float(mean[i]))
            for i, case in enumerate(order)]


def write_volume_dice_csv(path: str | Path, rows: Sequence[SliceMetrics], methods: Sequence[str]) -> None:
    """``dice_volume.csv``: ``method,case,slices,dice_volume_liver,dice_volume_tumour,dice_volume``, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "case", "slices", "dice_volume_liver", "dice_volume_tumour", "dice_volume"])
    for method in methods:
        for v in volume_dice(rows, method):
            writer.writerow([v.method, v.case, v.slices, _cell(v.liver), _cell(v.tumour), _cell(v.mean)])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def _mean_std(values: Sequence[float], digits: int, total: int | None = None) -> str:
    """``mean ± std`` (population std) of the counted (non-NaN) values; ``(n = k)`` when fewer than ``total`` count."""
    values = np.asarray(values, dtype=np.float64)
    if values.size and np.isinf(values).all():
        return "reference"
    counted = values[~np.isnan(values)]
    if counted.size == 0:
        return "n/a"
    text = f"{counted.mean():.{digits}f} ± {counted.std():.{digits}f}"
    if total is not None and counted.size < total:
        text += f" (n = {counted.size})"
    return text


def reconstruction_table(rows: Sequence[SliceMetrics], methods: Sequence[str], provenance: str = "") -> str:
    """Markdown table of mean ± std (population std) PSNR, SSIM and RMSE per method (Table I form)."""
    lines = ["Table I: PSNR and SSIM (mean ± std) inside the disc ROI, data range 1", ""]
    if provenance:
        lines += [provenance, ""]
    lines += ["| Method | PSNR (dB) | SSIM | RMSE (HU) | slices |", "|---|---|---|---|---|"]
    for method in methods:
        mine = [r for r in rows if r.method == method]
        if method == FULLDOSE:
            lines.append(f"| {method_label(method)} | reference | reference | 0 | {len(mine)} |")
            continue
        lines.append(
            f"| {method_label(method)} | {_mean_std([r.psnr for r in mine], 2)} | {_mean_std([r.ssim for r in mine], 4)} "
            f"| {_mean_std([r.rmse_hu for r in mine], 0)} | {len(mine)} |"
        )
    return "\n".join(lines) + "\n"


EMPTY_MAP = "empty map"
"""The reference row of the Dice table: a segmenter that finds nothing, scored like the methods."""


def _empty_map_rows(rows: Sequence[SliceMetrics]) -> list[SliceMetrics]:
    """Rows of a map with no liver and no tumour on every slice that has Dice counts."""
    slices = {(r.case, r.slice): r for r in rows if r.has_dice}
    return [dataclasses.replace(r, method=EMPTY_MAP, dice_counts=tuple((0, 0, ref) for _, _, ref in r.dice_counts))
            for r in slices.values()]


def dice_table(rows: Sequence[SliceMetrics], methods: Sequence[str], provenance: str = "") -> str:
    """Markdown Table II: each method's Dice under the three named conventions, then liver and tumour separately.

    (a) and (b) are mean ± std (population std) over slices, (c) over patients; ``n =``
    says how many were counted where a convention leaves some out. The last row scores an
    empty map (nothing found on any slice): what each convention gives a segmenter that
    fails entirely. Methods without Dice values are left out.
    """
    lines = ["Table II: Dice of the pre-trained segmentation model on each method's images, "
             "liver and tumour classes (background excluded)", ""]
    if provenance:
        lines += [provenance, ""]
    lines += ["Conventions: (a) per slice, eq. 7 of the paper: a class absent from both the predicted and the reference "
              "map scores 1; (b) per slice, over the classes present in the reference or the prediction (absent from "
              "both: not counted); (c) per volume, the LiTS convention: each patient's counts summed over its slices, "
              "absent classes not counted; mean over patients.", ""]
    lines += ["| Method | Dice (a) per slice, eq. 7 | Dice (b) per slice, present classes | Dice (c) per volume | slices | patients |",
              "|---|---|---|---|---|---|"]
    named = [(m, method_label(m)) for m in methods] + [(EMPTY_MAP, "Empty map (nothing found)")]
    all_rows = list(rows) + _empty_map_rows(rows)
    per_class_lines = []
    for method, label in named:
        mine = [r for r in all_rows if r.method == method and r.has_dice]
        if not mine:
            continue
        a = np.array([r.dice("slice_eq7") for r in mine])
        b = np.array([r.dice("slice_present") for r in mine])
        c = np.array([(v.liver, v.tumour, v.mean) for v in volume_dice(all_rows, method)])
        lines.append(f"| {label} | {_mean_std(a[:, 2], 4, len(mine))} | {_mean_std(b[:, 2], 4, len(mine))} "
                     f"| {_mean_std(c[:, 2], 4, len(c))} | {len(mine)} | {len(c)} |")
        per_class_lines.append(
            f"| {label} | {_mean_std(a[:, 0], 4, len(mine))} | {_mean_std(a[:, 1], 4, len(mine))} "
            f"| {_mean_std(b[:, 0], 4, len(mine))} | {_mean_std(b[:, 1], 4, len(mine))} "
            f"| {_mean_std(c[:, 0], 4, len(c))} | {_mean_std(c[:, 1], 4, len(c))} |")
    lines += ["", "Liver and tumour separately:", "",
              "| Method | liver (a) | tumour (a) | liver (b) | tumour (b) | liver (c) | tumour (c) |",
              "|---|---|---|---|---|---|---|", *per_class_lines]
    return "\n".join(lines) + "\n"


def segmenter_provenance(model: ModelFile) -> str:
    """One line naming the segmenter file, its epoch and its validation metrics."""
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(model.metrics.items())) or "none recorded"
    return f"Segmenter: {model.path.resolve()} ({model.task} model, epoch {model.epoch}; validation metrics: {metrics})."


def _provenance(dataset: SimulatedDataset, split: str) -> str:
    s = dataset.settings
    fbp = dataset.methods.get("fbp", {})
    bm3d = dataset.methods.get("bm3d", {})
    parts = [
        f"{split} split: {len(dataset.case_ids(split))} patient(s), {len(dataset.slices(split))} slices",
        f"N0 = {s['photons']:g} photons/bin, {s['num_angles']} angles, {s['size']}² px, {s['domain']} domain",
    ]
    if fbp:
        parts.append(f"FBP: Hann, frequency scaling {fbp['frequency_scaling']:g} ({fbp.get('tuned_on') or 'LoDoPaB default'})")
    if bm3d:
        parts.append(f"BM3D: sigma_psd {bm3d['sigma_psd']:g}")
    return "; ".join(parts) + "."


def pick_figure_slices(dataset: SimulatedDataset, refs: Sequence[SliceRef], count: int) -> list[SliceRef]:
    """Up to ``count`` slices to show: the one with the most liver and tumour of each case first."""
    if count <= 0:
        return []
    area = {ref: int(np.count_nonzero(dataset.segmentation(ref))) for ref in refs}
    best_per_case: dict[str, SliceRef] = {}
    for ref in refs:
        if ref.case not in best_per_case or area[ref] > area[best_per_case[ref.case]]:
            best_per_case[ref.case] = ref
    ordered = sorted(best_per_case.values(), key=lambda r: -area[r])
    ordered += sorted((r for r in refs if r not in ordered), key=lambda r: -area[r])
    return ordered[:count]


def display_slice(image: np.ndarray) -> np.ndarray:
    """Radiological display of an axial RAS slice: anterior up, patient's right on the left."""
    return image[::-1, ::-1].T


def plot_reconstructions(
    dataset: SimulatedDataset,
    ref: SliceRef,
    methods: Sequence[str],
    metrics: dict[str, SliceMetrics],
    path: str | Path,
) -> None:
    """Fig. 3-style row: each method's image of one slice with its PSNR and SSIM, full dose last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [m for m in methods if m != FULLDOSE] + [FULLDOSE]
    level, width = SOFT_TISSUE_WINDOW_HU
    fig, axes = plt.subplots(1, len(order), figsize=(3.2 * len(order), 3.9), squeeze=False, layout="constrained")
    for ax, method in zip(axes[0], order):
        ax.imshow(display_slice(dataset.slice_hu(method, ref)), cmap="gray", vmin=level - width / 2, vmax=level + width / 2)
        ax.set_title(_panel_title(method, metrics.get(method)), fontsize=9)
        ax.axis("off")
    fig.suptitle(f"case {ref.case}, slice {ref.index} (window L{level:g} W{width:g} HU)", fontsize=10)
    _save_figure(fig, path)


def _panel_title(method: str, m: SliceMetrics | None) -> str:
    """Method label, then PSNR and SSIM (the full dose is their reference), then Dice when measured."""
    if method == FULLDOSE:
        title = "Full-dose (reference)"
    else:
        title = f"{method_label(method)}\nPSNR {m.psnr:.2f} dB, SSIM {m.ssim:.3f}"
    if m is not None and m.has_dice:
        liver, tumour, _ = m.dice("slice_present")
        title += f"\nDice liver {_score_text(liver)}, tumour {_score_text(tumour)}"
    return title


def _score_text(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def label_overlay(labels: np.ndarray) -> np.ndarray:
    """RGBA ``(H, W, 4)`` overlay of a label map: liver green, tumour red, background clear."""
    overlay = np.zeros(labels.shape + (4,), dtype=np.float32)
    for label, colour in SEGMENTATION_COLOURS.items():
        overlay[labels == label] = (*colour, OVERLAY_ALPHA)
    return overlay


def plot_segmentations(
    dataset: SimulatedDataset,
    ref: SliceRef,
    methods: Sequence[str],
    metrics: dict[str, SliceMetrics],
    predictions: dict[str, np.ndarray],
    path: str | Path,
) -> None:
    """Fig. 4-style row: g's predicted map over each method's image, full dose, then the reference map.

    Args:
        predictions: each method's ``(N, N)`` label map of this slice, from the segmenter
            (the full-dose panel is drawn when the full dose is among them).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [m for m in methods if m != FULLDOSE] + ([FULLDOSE] if FULLDOSE in predictions else [])
    level, width = SOFT_TISSUE_WINDOW_HU
    panels = [(dataset.slice_hu(m, ref), predictions[m], _panel_title(m, metrics.get(m))) for m in order]
    panels.append((dataset.slice_hu(FULLDOSE, ref), dataset.segmentation(ref), "Ground truth map\n(on the full dose)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.9), squeeze=False, layout="constrained")
    for ax, (image, labels, title) in zip(axes[0], panels):
        ax.imshow(display_slice(image), cmap="gray", vmin=level - width / 2, vmax=level + width / 2)
        ax.imshow(label_overlay(display_slice(labels)), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"case {ref.case}, slice {ref.index}: segmenter maps (liver green, tumour red; "
                 f"window L{level:g} W{width:g} HU)", fontsize=10)
    _save_figure(fig, path)


def plot_metric_distributions(rows: Sequence[SliceMetrics], methods: Sequence[str], path: str | Path) -> None:
    """Box plots of per-slice PSNR and SSIM per method, and of Dice when the rows have it.

    The full dose is the reference of PSNR and SSIM and is left out of them; its Dice is the
    upper limit the others are compared with, so it is shown there.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in methods if m != FULLDOSE]
    panels = [(lambda r: r.psnr, "PSNR (dB)", shown), (lambda r: r.ssim, "SSIM", shown)]
    if any(r.has_dice for r in rows):
        panels.append((lambda r: r.dice("slice_present")[2], "Dice per slice, present classes (b)", list(methods)))
    longest = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (1.6 + 0.75 * longest), 4.2), squeeze=False,
                             layout="constrained")
    for ax, (value, ylabel, names) in zip(axes[0], panels):
        data = [[value(r) for r in rows if r.method == m and not math.isnan(value(r))] for m in names]
        ax.boxplot(data)
        ax.set_xticks(range(1, len(names) + 1), [method_label(m) for m in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    slices = len({(r.case, r.slice) for r in rows})
    fig.suptitle(f"Per-slice quality ({slices} slices)", fontsize=10)
    _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    engine = fig.get_layout_engine()
    if engine is not None and hasattr(engine, "set"):  # constrained layout: room between suptitle and titles
        engine.set(h_pad=0.06)

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)

