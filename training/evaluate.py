"""Evaluation and report (``tact evaluate``): the paper's Table I and Fig. 3 for a data set.

Writes, into the report folder:

* ``metrics.csv``: one row per method and slice, ``method,case,slice,psnr,ssim,rmse_hu``
  (ROI PSNR in dB and SSIM on the normalised image with data range 1; RMSE against the
  full dose inside the ROI, in HU);
* ``table_reconstruction.md``: mean ± std per method, in the form of the paper's Table I;
* ``figures/``: Fig. 3-style panels (low-dose, each method, full dose, with per-image PSNR
  and SSIM) and box plots of PSNR and SSIM per method.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from training.dataset import FULLDOSE, SimulatedDataset, SliceRef, worker_dataset
from training.errors import DataError
from training.fileio import atomic_path
from training.metrics import roi_psnr_ssim
from training.parallel import process_pool
from training.physics import disc_mask, hu_per_normalized_unit

log = logging.getLogger(__name__)

METHOD_LABELS = {"lowdose": "Low-dose", "fbp": "FBP", "bm3d": "BM3D", "fulldose": "Full-dose"}
DEFAULT_METHODS = ("lowdose", "fbp", "bm3d", "fulldose")
SOFT_TISSUE_WINDOW_HU = (40.0, 400.0)
"""(level, width) of the display window."""


@dataclass(frozen=True)
class SliceMetrics:
    """Reconstruction quality of one method on one slice (ROI: the inscribed disc)."""

    method: str
    case: str
    slice: int
    psnr: float
    ssim: float
    rmse_hu: float


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


def evaluate_dataset(
    dataset: SimulatedDataset,
    methods: Sequence[str] = DEFAULT_METHODS,
    out: str | Path = "report",
    split: str = "test",
    figures: int = 2,
    workers: int | None = None,
    progress: bool = True,
) -> list[SliceMetrics]:
    """Measure ``methods`` on every slice of ``split`` and write the report into ``out``.

    Raises:
        DataError: if a method has not been computed for the data set, or the split is empty.
    """
    methods = tuple(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHOD_LABELS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHOD_LABELS)}")
    missing = [m for m in methods if not dataset.has_method(m)]
    if missing:
        raise DataError(dataset.root, f"method(s) {missing} not computed for this data set; run `tact baseline {missing[0]}` first")
    refs = dataset.slices(split)
    if not refs:
        raise DataError(dataset.root, f"the {split!r} split holds no slices (splits: {dataset.manifest['split']})")
    out = Path(out)
    jobs = [_Job(str(dataset.root), ref, methods) for ref in refs]
    with process_pool(workers) as pool:
        per_slice = list(tqdm(pool.imap(_evaluate_slice, jobs), total=len(jobs), desc="evaluate", unit="slice", disable=not progress))
    rows = [row for slice_rows in per_slice for row in slice_rows]
    write_metrics_csv(out / "metrics.csv", rows)
    with atomic_path(out / "table_reconstruction.md") as tmp:
        tmp.write_text(reconstruction_table(rows, methods, _provenance(dataset, split)))
    figure_refs = pick_figure_slices(dataset, refs, figures)
    for ref in figure_refs:
        metrics = {r.method: r for r in rows if r.case == ref.case and r.slice == ref.index}
        plot_reconstructions(dataset, ref, methods, metrics, out / "figures" / f"reconstructions_{ref.case}_{ref.index:03d}.png")
    plot_metric_distributions(rows, methods, out / "figures" / "metrics_boxplot.png")
    log.info("wrote %s (%d slices, %d methods, %d figures)", out, len(refs), len(methods), len(figure_refs) + 1)
    return rows


def write_metrics_csv(path: str | Path, rows: Sequence[SliceMetrics]) -> None:
    """One CSV row per method and slice, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(SliceMetrics)], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in asdict(row).items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def read_metrics_csv(path: str | Path) -> list[SliceMetrics]:
    with open(path, newline="") as handle:
        return [
            SliceMetrics(r["method"], r["case"], int(r["slice"]), float(r["psnr"]), float(r["ssim"]), float(r["rmse_hu"]))
            for r in csv.DictReader(handle)
        ]


def _mean_std(values: Sequence[float], digits: int) -> str:
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        return "reference"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def reconstruction_table(rows: Sequence[SliceMetrics], methods: Sequence[str], provenance: str = "") -> str:
    """Markdown table of mean ± std (population std) PSNR, SSIM and RMSE per method (Table I form)."""
    lines = ["Table I: PSNR and SSIM (mean ± std) inside the disc ROI, data range 1", ""]
    if provenance:
        lines += [provenance, ""]
    lines += ["| Method | PSNR (dB) | SSIM | RMSE (HU) | slices |", "|---|---|---|---|---|"]
    for method in methods:
        mine = [r for r in rows if r.method == method]
        if method == FULLDOSE:
            lines.append(f"| {METHOD_LABELS[method]} | reference | reference | 0 | {len(mine)} |")
            continue
        lines.append(
            f"| {METHOD_LABELS[method]} | {_mean_std([r.psnr for r in mine], 2)} | {_mean_std([r.ssim for r in mine], 4)} "
            f"| {_mean_std([r.rmse_hu for r in mine], 0)} | {len(mine)} |"
        )
    return "\n".join(lines) + "\n"


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
    fig, axes = plt.subplots(1, len(order), figsize=(3.2 * len(order), 3.6), squeeze=False)
    for ax, method in zip(axes[0], order):
        ax.imshow(display_slice(dataset.slice_hu(method, ref)), cmap="gray", vmin=level - width / 2, vmax=level + width / 2)
        if method == FULLDOSE:
            title = "Full-dose (reference)"
        else:
            m = metrics[method]
            title = f"{METHOD_LABELS[method]}\nPSNR {m.psnr:.2f} dB, SSIM {m.ssim:.3f}"
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"case {ref.case}, slice {ref.index} (window L{level:g} W{width:g} HU)", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_metric_distributions(rows: Sequence[SliceMetrics], methods: Sequence[str], path: str | Path) -> None:
    """Box plots of per-slice PSNR and SSIM for each method (full dose excluded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in methods if m != FULLDOSE]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(shown), 3.6))
    for ax, metric, unit in zip(axes, ("psnr", "ssim"), ("dB", "")):
        data = [[getattr(r, metric) for r in rows if r.method == m] for m in shown]
        ax.boxplot(data)
        ax.set_xticks(range(1, len(shown) + 1), [METHOD_LABELS[m] for m in shown])
        ax.set_ylabel(f"{metric.upper()} ({unit})" if unit else metric.upper())
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Per-slice reconstruction quality ({len(data[0]) if data else 0} slices)", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)

