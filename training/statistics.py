"""Statistics over seeds, patients and slices: ``report/statistics.md`` of ``tact reproduce --seeds N``.

Input: the ``metrics.csv`` of one evaluation per seed (the same test slices, each seed's
trained networks and its own g). For every method:

* **Point estimates** are means over patients of per-patient values, averaged over seeds:
  PSNR (dB, each patient's mean over its slices), Dice (c) per volume (each patient's
  slices' counts summed) and Dice (b) per slice over present classes (each patient's mean
  over its slices where it is defined).
* **95% intervals** are percentile intervals of a two-stage bootstrap: patients are drawn
  with replacement, then slices with replacement within each drawn patient, and the
  statistic is recomputed (:data:`BOOTSTRAP_RESAMPLES` draws, seeded). With four test
  patients the interval is mostly the spread between patients; it does not include the
  uncertainty of g's own training beyond the seeds given.
* **Paired tests**: Wilcoxon signed-rank, two-sided, of a method against another over the
  test *slices* (each slice's value averaged over seeds; slices of one patient are not
  independent, so the p-values are optimistic), and over the *patients* (each patient's
  value averaged over seeds; with n patients the smallest two-sided p is 2 / 2**n, 0.125
  for four, so no patient-level test can reach 0.05 here).
* **Per seed**: each seed's PSNR and Dice (c), and whether a task-adaptive method met the
  goal: Dice (c) at least :data:`GOAL_DICE_FRACTION` of the full dose's and PSNR within
  :data:`GOAL_PSNR_DB` of the Base U-Net's, under that seed's g.

This module reads CSV files only (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from training.evaluate import SliceMetrics, read_metrics_csv
from training.fileio import atomic_path, save_json
from training.methods import BASE_UNET, method_label
from training.metrics import dice_from_counts

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
GOAL_DICE_FRACTION = 0.9
GOAL_PSNR_DB = 2.0
METRICS = ("psnr", "dice_volume", "dice_slice")
METRIC_LABELS = {"psnr": "PSNR (dB)", "dice_volume": "Dice (c) per volume", "dice_slice": "Dice (b) per slice"}


@dataclass(frozen=True)
class MethodData:
    """One method's test slices over seeds.

    ``psnr`` ``(S, N)`` and ``counts`` ``(S, N, 2, 3)`` for S seeds and N slices (in the
    same slice order for every seed); ``cases`` ``(N,)`` the patient of each slice.
    """

    psnr: np.ndarray
    counts: np.ndarray | None
    cases: np.ndarray


def collect(reports: Sequence[Path], methods: Sequence[str]) -> dict[str, MethodData]:
    """Read each seed's ``metrics.csv`` and line up the slices of every method.

    Raises:
        ValueError: a method missing from a report, or reports of different slices.
    """
    rows_of_seed = [read_metrics_csv(Path(report) / "metrics.csv") for report in reports]
    out: dict[str, MethodData] = {}
    for method in methods:
        per_seed: list[list[SliceMetrics]] = []
        for report, rows in zip(reports, rows_of_seed):
            mine = sorted((r for r in rows if r.method == method), key=lambda r: (r.case, r.slice))
            if not mine:
                raise ValueError(f"{report}: no rows of method {method!r}")
            per_seed.append(mine)
        keys = [(r.case, r.slice) for r in per_seed[0]]
        for report, mine in zip(reports, per_seed):
            if [(r.case, r.slice) for r in mine] != keys:
                raise ValueError(f"{report}: method {method!r} was evaluated on other slices than in {reports[0]}")
        psnr = np.array([[r.psnr for r in mine] for mine in per_seed], dtype=np.float64)
        has_counts = all(r.has_dice for mine in per_seed for r in mine)
        counts = np.array([[r.dice_counts for r in mine] for mine in per_seed], dtype=np.int64) if has_counts else None
        out[method] = MethodData(psnr=psnr, counts=counts, cases=np.array([case for case, _ in keys]))
    return out


def _per_patient(data: MethodData, metric: str, slices: np.ndarray) -> np.ndarray:
    """``(S, P)`` per-patient values of one metric, for each seed, over the slice indices ``slices`` of each patient.

    ``slices`` is a list (one per patient) of index arrays into the method's slices.
    """
    values = np.full((data.psnr.shape[0], len(slices)), np.nan)
    for p, index in enumerate(slices):
        if metric == "psnr":
            values[:, p] = data.psnr[:, index].mean(axis=1)
        elif data.counts is None:
            continue
        elif metric == "dice_volume":
            summed = data.counts[:, index].sum(axis=1)  # (S, 2, 3)
            per_class = dice_from_counts(summed, absent=math.nan)  # (S, 2)
            values[:, p] = _nanmean_rows(per_class)
        elif metric == "dice_slice":
            per_class = dice_from_counts(data.counts[:, index].reshape(-1, 2, 3), absent=math.nan).reshape(
                data.counts.shape[0], len(index), 2)
            values[:, p] = _nanmean_rows(_nanmean_rows(per_class, axis=2), axis=1)
        else:
            raise ValueError(f"unknown metric {metric!r}; known: {METRICS}")
    return values


def _nanmean_rows(values: np.ndarray, axis: int = -1) -> np.ndarray:
    counted = np.isfinite(values)
    total = np.where(counted, values, 0.0).sum(axis=axis)
    n = counted.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _patients(cases: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    order = list(dict.fromkeys(cases.tolist()))
    return order, [np.flatnonzero(cases == case) for case in order]


def estimate(data: MethodData, metric: str, resamples: int = BOOTSTRAP_RESAMPLES,
             seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean over patients (and seeds) and its two-stage bootstrap 95% interval."""
    _, slices = _patients(data.cases)
    point = float(np.nanmean(_per_patient(data, metric, slices).mean(axis=0)))
    if not math.isfinite(point):
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for b in range(resamples):
        chosen = rng.integers(0, len(slices), len(slices))
        resampled = [slices[p][rng.integers(0, len(slices[p]), len(slices[p]))] for p in chosen]
        draws[b] = np.nanmean(_per_patient(data, metric, resampled).mean(axis=0))
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return point, float(low), float(high)


def _slice_values(data: MethodData, metric: str) -> np.ndarray:
    """Each slice's value averaged over seeds (Dice: (b) per slice; the volume convention has no slice value)."""
    if metric == "psnr":
        return data.psnr.mean(axis=0)
    if data.counts is None:
        return np.full(data.psnr.shape[1], np.nan)
    s, n = data.counts.shape[:2]
    per_class = dice_from_counts(data.counts.reshape(-1, 2, 3), absent=math.nan).reshape(s, n, 2)
    return _nanmean_rows(_nanmean_rows(per_class, axis=2), axis=0)


@dataclass(frozen=True)
class PairedTest:
    """A two-sided Wilcoxon signed-rank test of ``method`` against ``reference`` (differences method - reference)."""

    method: str
    reference: str
    metric: str
    unit: str  # "slices" or "patients"
    n: int
    median_difference: float
    statistic: float
    p_value: float


def paired_test(a: MethodData, b: MethodData, names: tuple[str, str], metric: str, unit: str) -> PairedTest:
    """Wilcoxon signed-rank over slices (``dice_slice``, ``psnr``) or patients (any metric)."""
    if unit == "slices":
        if metric == "dice_volume":
            raise ValueError("Dice (c) is a per-volume value: test it over patients")
        x, y = _slice_values(a, metric), _slice_values(b, metric)
    elif unit == "patients":
        _, slices = _patients(a.cases)
        x, y = _per_patient(a, metric, slices).mean(axis=0), _per_patient(b, metric, slices).mean(axis=0)
    else:
        raise ValueError(f"unit must be 'slices' or 'patients', got {unit!r}")
    keep = np.isfinite(x) & np.isfinite(y)
    difference = x[keep] - y[keep]
    if keep.sum() == 0 or np.all(difference == 0):
        return PairedTest(*names, metric, unit, int(keep.sum()), 0.0, math.nan, 1.0)
    result = wilcoxon(x[keep], y[keep], alternative="two-sided")
    return PairedTest(*names, metric, unit, int(keep.sum()), float(np.median(difference)), float(result.statistic),
                      float(result.pvalue))


def _interval(value: tuple[float, float, float], digits: int) -> str:
    mean, low, high = value
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _psnr_cell(value: float) -> str:
    """A PSNR in a table: the full dose against itself is the reference, not infinitely good."""
    return "reference" if value == math.inf else f"{value:.2f}"


def write_statistics(reports: Sequence[Path], methods: Sequence[str], out: Path, title: str = "") -> dict:
    """Write ``out/statistics.md`` and ``out/statistics.json`` from one report per seed (see the module docstring).

    Returns:
        the JSON record (estimates, tests, per-seed values, goal checks).
    """
    data = collect(reports, methods)
    seeds = len(reports)
    estimates = {m: {k: estimate(data[m], k) for k in METRICS} for m in methods}
    adaptive = [m for m in methods if m.startswith("ta")]
    references = [m for m in (BASE_UNET, "bm3d") if m in methods]
    tests = [paired_test(data[m], data[r], (m, r), metric, unit)
             for m in adaptive for r in references
             for metric, unit in (("psnr", "slices"), ("dice_slice", "slices"), ("psnr", "patients"),
                                  ("dice_volume", "patients"))]
    per_seed = {m: {k: [float(np.nanmean(v)) for v in _per_patient(data[m], k, _patients(data[m].cases)[1])]
                    for k in ("psnr", "dice_volume")} for m in methods}
    goals = {}
    if "fulldose" in methods and BASE_UNET in methods:
        for m in adaptive:
            goals[m] = [bool(per_seed[m]["dice_volume"][s] >= GOAL_DICE_FRACTION * per_seed["fulldose"]["dice_volume"][s]
                             and per_seed[m]["psnr"][s] >= per_seed[BASE_UNET]["psnr"][s] - GOAL_PSNR_DB)
                        for s in range(seeds)]
    patients = list(dict.fromkeys(data[methods[0]].cases.tolist()))
    lines = [f"# Statistics{': ' + title if title else ''}", "",
             f"{seeds} seed(s); {len(patients)} test patients ({', '.join(patients)}), "
             f"{len(data[methods[0]].cases)} slices. Means over patients of per-patient values, averaged over seeds; "
             f"[95% interval: two-stage bootstrap over patients, then slices within them, {BOOTSTRAP_RESAMPLES} draws].",
             "", "| Method | " + " | ".join(METRIC_LABELS[k] for k in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for m in methods:
        lines.append(f"| {method_label(m)} | " + " | ".join(_interval(estimates[m][k], 2 if k == "psnr" else 3)
                                                         for k in METRICS) + " |")
    if tests:
        lines += ["", "Paired tests (Wilcoxon signed-rank, two-sided; difference = first − second; slice values are "
                      "averaged over seeds, slices of one patient are not independent; over patients the smallest "
                      f"possible p is {2 / 2 ** len(patients):.3g}):", "",
                  "| Comparison | Metric | Over | n | Median difference | p |", "|---|---|---|---|---|---|"]
        for t in tests:
            digits = 2 if t.metric == "psnr" else 3
            lines.append(f"| {method_label(t.method)} vs {method_label(t.reference)} | {METRIC_LABELS[t.metric]} | "
                         f"{t.unit} | {t.n} | {t.median_difference:+.{digits}f} | {t.p_value:.3g} |")
    lines += ["", "Per seed (PSNR dB / Dice (c)):", "", "| Method | " + " | ".join(f"seed {s}" for s in range(seeds)) + " |",
              "|---|" + "---|" * seeds]
    for m in methods:
        lines.append(f"| {method_label(m)} | " + " | ".join(
            f"{_psnr_cell(per_seed[m]['psnr'][s])} / {per_seed[m]['dice_volume'][s]:.3f}" for s in range(seeds)) + " |")
    if goals:
        lines += ["", f"Goal (Dice (c) ≥ {GOAL_DICE_FRACTION:.0%} of the full dose's and PSNR within {GOAL_PSNR_DB:g} dB "
                      "of the Base U-Net's, same seed):", ""]
        for m, met in goals.items():
            lines.append(f"- {method_label(m)}: met for {sum(met)} of {seeds} seed(s)"
                         + (f" ({', '.join(str(s) for s, ok in enumerate(met) if ok)})" if any(met) else ""))
    record = {"seeds": seeds, "patients": patients, "estimates": estimates, "per_seed": per_seed, "goals": goals,
              "tests": [t.__dict__ for t in tests]}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "statistics.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    save_json(out / "statistics.json", record)
    return record
