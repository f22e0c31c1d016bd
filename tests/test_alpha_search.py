"""Automatic alpha (`tact train reconstruction --alpha auto`): the rule, the schedule, a real search, refusals.

The search runs for real on a 64 px phantom data set with narrow U-Nets: every candidate is
an ordinary training run, paused and continued rung by rung.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.alpha_search import DEFAULT_GRID, MAX_COST_IN_TRAININGS, Candidate, rank, schedule, search_cost
from training.checkpoints import read_model
from training.engine import read_history, read_summary
from training.phantom import write_phantom_dataset
from training.simulate import SimulationSettings, simulate_dataset

TACT = Path(sys.executable).with_name("tact")
TINY = ["network.features=4", "network.depth=2", "num_workers=0", "validation_fraction=0.34", "batch_size=4"]


def tact(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(TACT), "-q", *args], capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"tact {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search")
    write_phantom_dataset(root / "lits", 5, size=64, slices=8, seed=11, progress=False)
    simulate_dataset(root / "lits", root / "dataset", SimulationSettings(photons=300, num_angles=64, size=64, seed=2),
                     workers=2, progress=False)
    return root / "dataset"


@pytest.fixture(scope="module")
def segmenter(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("g")
    tact("train", "segmentation", "--dataset", str(data), "--out", str(run), "epochs=3", *TINY)
    return run / "best.pt"


def _candidate(alpha: float, psnr: float, dice: float) -> Candidate:
    return Candidate(alpha=alpha, rung=1, epochs=5, best_epoch=5, val_psnr=psnr, val_dice=dice, stopped_early=False)


def test_the_rule_takes_the_best_dice_within_the_tolerance_else_the_best_psnr():
    base = 32.0
    candidates = [_candidate(0.01, 31.9, 0.60), _candidate(0.1, 30.5, 0.70), _candidate(0.3, 29.0, 0.75),
                  _candidate(0.9, math.nan, 0.80)]
    assert [c.alpha for c in rank(candidates, base)] == [0.1, 0.01, 0.3, 0.9]  # 0.3 is 3 dB below: out by Dice
    assert [c.alpha for c in rank(candidates, base, tolerance_db=4.0)] == [0.3, 0.1, 0.01, 0.9]
    assert [c.alpha for c in rank(candidates, 40.0)] == [0.01, 0.1, 0.3, 0.9]  # none within: PSNR decides


def test_the_default_search_costs_at_most_three_trainings():
    assert schedule(30, len(DEFAULT_GRID)) == [(8, 5), (15, 2), (30, 1)]
    assert search_cost(30, len(DEFAULT_GRID), with_baseline=False) == pytest.approx(5 * 8 / 30 + 2 * 7 / 30 + 15 / 30)
    assert search_cost(30, len(DEFAULT_GRID), with_baseline=True) <= MAX_COST_IN_TRAININGS


def test_a_real_search_records_every_alpha_and_leaves_the_continued_run_of_the_chosen_one(data, segmenter, tmp_path):
    out = tmp_path / "auto"
    result = tact("train", "reconstruction", "--alpha", "auto", "--alpha-grid", "0.1,0.5,0.9", "--segmenter", str(segmenter),
                  "--dataset", str(data), "--out", str(out), "epochs=4", "early_stopping_patience=10", *TINY)
    record = json.loads((out / "alpha_search.json").read_text())
    chosen = record["chosen"]
    assert f"alpha = {chosen:g} chosen on validation patients" in result.stdout
    rungs = {}
    for candidate in record["candidates"]:
        rungs.setdefault(candidate["rung"], []).append(candidate)
    assert [sorted(c["alpha"] for c in rungs[r]) for r in (1,)] == [[0.1, 0.5, 0.9]]
    assert [len(rungs[r]) for r in (1, 2, 3)] == [3, 1, 1] and [rungs[r][0]["epochs"] for r in (2, 3)] == [2, 4]
    assert {c["epochs"] for c in rungs[1]} == {1}
    # Each rung keeps the candidate the rule ranks first among the previous rung's.
    base = record["base_psnr"]
    first = rank([Candidate(**c) for c in rungs[1]], base)[0]
    assert rungs[2][0]["alpha"] == first.alpha == chosen
    assert base == pytest.approx(read_model(tmp_path / "auto" / "search" / "baseunet" / "best.pt").metrics["val_psnr"])
    # A normal run folder: the chosen model, its history and summary.
    model = read_model(out / "best.pt")
    assert model.task == "reconstruction" and model.weight == chosen
    assert read_summary(out).epochs == 4 and [row["epoch"] for row in read_history(out)] == [1, 2, 3, 4]
    assert (out / "alpha_search.md").read_text().count("\n| ") == 5 + 1  # header + 5 candidate rows
    # Paused and continued, the chosen run is the uninterrupted 4-epoch run of that alpha, weight for weight.
    straight = tmp_path / "straight"
    tact("train", "reconstruction", "--alpha", repr(chosen), "--segmenter", str(segmenter), "--dataset", str(data),
         "--out", str(straight), "epochs=4", "early_stopping_patience=10", *TINY)
    a, b = read_model(out / "best.pt").state["reconstructor"], read_model(straight / "best.pt").state["reconstructor"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Started again, the finished search does not train anything and chooses the same.
    again = tact("train", "reconstruction", "--alpha", "auto", "--alpha-grid", "0.1,0.5,0.9", "--segmenter", str(segmenter),
                 "--dataset", str(data), "--out", str(out), "epochs=4", "early_stopping_patience=10", *TINY)
    assert json.loads((out / "alpha_search.json").read_text())["chosen"] == chosen and "chosen on validation" in again.stdout

    # --baseline: a Base U-Net of the same validation patients is used as it is; one of others is refused.
    reuse = tmp_path / "reuse"
    tact("train", "reconstruction", "--alpha", "auto", "--alpha-grid", "0.1,0.9", "--baseline",
         str(out / "search" / "baseunet" / "best.pt"), "--segmenter", str(segmenter), "--dataset", str(data),
         "--out", str(reuse), "epochs=2", *TINY)
    assert not (reuse / "search" / "baseunet").exists()
    assert json.loads((reuse / "alpha_search.json").read_text())["base_psnr"] == pytest.approx(base)
    # With the normalised loss and a warm start, both from that Base U-Net: every candidate uses them.
    base_unet = out / "search" / "baseunet" / "best.pt"
    balanced = tmp_path / "balanced"
    tact("train", "reconstruction", "--alpha", "auto", "--alpha-grid", "0.1,0.9", "--baseline", str(base_unet),
         "--init", str(base_unet), "--normalise-with", str(base_unet), "--segmenter", str(segmenter),
         "--dataset", str(data), "--out", str(balanced), "epochs=2", *TINY)
    for run in (balanced, *(balanced / "search").glob("ta*")):
        inputs = json.loads((run / "inputs.json").read_text())
        assert inputs["init"]["path"] == inputs["loss_reference"]["path"] == str(base_unet.resolve()), run
        assert set(inputs["loss_reference"]["scales"]) == {"mse", "dice_loss"}, run
    refused = tact("train", "reconstruction", "--alpha", "auto", "--baseline", str(out / "search" / "baseunet" / "best.pt"),
                   "--segmenter", str(segmenter), "--dataset", str(data), "--out", str(tmp_path / "other"), "epochs=2",
                   *TINY, "seed=5", check=False)
    assert refused.returncode == 2 and "was validated on patients" in refused.stderr, refused.stderr


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "auto"], "needs the pre-trained segmentation network"),
    (["--alpha", "0.5", "--alpha-grid", "0.1,0.2", "--segmenter", "G"], "--alpha-grid: is an option of --alpha auto"),
    (["--alpha", "auto", "--alpha-grid", "0.1,1.5", "--segmenter", "G"], "alphas must be in (0, 1]"),
    (["--alpha", "auto", "--segmenter", "G", "validation_fraction=0"], "validation_fraction must be above 0"),
    (["--alpha", "auto", "--alpha-grid", "0.01,0.02,0.03,0.05,0.1,0.2,0.3,0.9", "--segmenter", "G"], "full trainings (at most 3)"),
    (["--alpha", "auto", "--baseline", "G", "--segmenter", "G"], "not a Base U-Net"),
    (["--alpha", "most", "--segmenter", "G"], "must be a number in [0, 1] or 'auto'"),
])
def test_bad_search_options_are_refused_before_training(data, segmenter, tmp_path, flags, message):
    flags = [str(segmenter) if flag == "G" else flag for flag in flags]
    tiny = [option for option in TINY if not any(flag.startswith(option.split("=")[0]) for flag in flags)]
    result = tact("train", "reconstruction", *flags, "--dataset", str(data), "--out", str(tmp_path / "run"), *tiny, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
