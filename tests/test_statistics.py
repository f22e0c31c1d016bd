"""report/statistics.md: the estimates agree with the evaluation's own numbers, the bootstrap and the tests behave."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.evaluate import SliceMetrics, volume_dice, write_metrics_csv
from training.statistics import collect, estimate, paired_test, write_statistics


def _rows(method: str, seed: int, psnr_shift: float = 0.0, liver_hit: float = 0.8) -> list[SliceMetrics]:
    """Three patients with 4, 6 and 9 slices; per-slice counts (overlap, predicted, reference) for liver and tumour."""
    rng = np.random.default_rng(seed)
    rows = []
    for case, slices in (("2", 4), ("3", 6), ("11", 9)):
        for index in range(slices):
            reference = int(rng.integers(200, 400))
            overlap = int(liver_hit * reference)
            tumour = (0, 0, 0) if case == "3" else (int(rng.integers(0, 20)), 25, 30)
            rows.append(SliceMetrics(method, case, index, 30.0 + psnr_shift + float(rng.normal(0, 0.5)), 0.8, 20.0,
                                     ((overlap, reference, reference), tumour)))
    return rows


def _report(tmp_path, seed: int, methods: dict) -> object:
    report = tmp_path / f"seed{seed}"
    report.mkdir()
    rows = [row for method, kwargs in methods.items() for row in _rows(method, seed, **kwargs)]
    write_metrics_csv(report / "metrics.csv", rows)
    return report, rows


METHODS = {"fulldose": {"liver_hit": 0.95}, "bm3d": {"psnr_shift": 1.0, "liver_hit": 0.6}, "baseunet": {"psnr_shift": 2.0},
           "ta0.1": {"psnr_shift": 1.5, "liver_hit": 0.9}}


def test_the_point_estimates_are_the_evaluations_per_patient_means(tmp_path):
    report, rows = _report(tmp_path, 0, METHODS)
    data = collect([report], list(METHODS))
    for method in METHODS:
        mine = [r for r in rows if r.method == method]
        patients = ["2", "3", "11"]
        psnr = np.mean([np.mean([r.psnr for r in mine if r.case == case]) for case in patients])
        assert estimate(data[method], "psnr", resamples=50)[0] == pytest.approx(psnr)
        assert estimate(data[method], "dice_volume", resamples=50)[0] == pytest.approx(
            np.mean([v.mean for v in volume_dice(rows, method)]))
        point, low, high = estimate(data[method], "dice_slice", resamples=200)
        assert low <= point <= high


def test_seeds_are_averaged_and_the_interval_narrows_with_agreeing_seeds(tmp_path):
    reports = [_report(tmp_path, seed, METHODS)[0] for seed in range(3)]
    data = collect(reports, list(METHODS))
    assert data["ta0.1"].psnr.shape == (3, 19)
    single = collect(reports[:1], ["ta0.1"])["ta0.1"]
    mean_over_seeds = np.mean([estimate(collect([r], ["ta0.1"])["ta0.1"], "psnr", resamples=10)[0] for r in reports])
    assert estimate(data["ta0.1"], "psnr", resamples=10)[0] == pytest.approx(mean_over_seeds)
    width = lambda value: value[2] - value[1]  # noqa: E731
    assert width(estimate(data["ta0.1"], "psnr")) < width(estimate(single, "psnr"))


def test_the_paired_tests_find_a_consistent_shift_and_not_a_null_one(tmp_path):
    report, _ = _report(tmp_path, 0, {"baseunet": {"psnr_shift": 2.0}, "ta0.1": {"psnr_shift": 1.0}, "bm3d": {"psnr_shift": 2.0}})
    data = collect([report], ["baseunet", "ta0.1", "bm3d"])
    shifted = paired_test(data["ta0.1"], data["baseunet"], ("ta0.1", "baseunet"), "psnr", "slices")
    assert shifted.n == 19 and shifted.median_difference == pytest.approx(-1.0) and shifted.p_value < 1e-3
    same = paired_test(data["bm3d"], data["baseunet"], ("bm3d", "baseunet"), "psnr", "slices")
    assert same.p_value == 1.0 and same.median_difference == 0.0
    over_patients = paired_test(data["ta0.1"], data["baseunet"], ("ta0.1", "baseunet"), "psnr", "patients")
    assert over_patients.n == 3 and over_patients.p_value >= 0.25  # 3 patients: the smallest two-sided p is 0.25
    with pytest.raises(ValueError, match="test it over patients"):
        paired_test(data["ta0.1"], data["baseunet"], ("ta0.1", "baseunet"), "dice_volume", "slices")


def test_the_report_names_the_goal_per_seed_and_refuses_mismatched_reports(tmp_path):
    reports = [_report(tmp_path, seed, METHODS)[0] for seed in range(2)]
    record = write_statistics(reports, list(METHODS), tmp_path / "out")
    text = (tmp_path / "out" / "statistics.md").read_text()
    # ta0.1: liver 0.9 against the full dose's 0.95 and 0.5 dB below the Base U-Net: the goal holds for both seeds.
    assert record["goals"] == {"ta0.1": [True, True]} and "met for 2 of 2 seed(s)" in text
    assert "Task-adaptive α=0.1 vs Base U-Net" in text and "Wilcoxon signed-rank" in text
    assert json.loads((tmp_path / "out" / "statistics.json").read_text())["seeds"] == 2
    short = tmp_path / "short"
    short.mkdir()
    write_metrics_csv(short / "metrics.csv", [r for r in _rows("ta0.1", 0) if r.case != "11"])
    with pytest.raises(ValueError, match="other slices"):
        collect([reports[0], short], ["ta0.1"])
