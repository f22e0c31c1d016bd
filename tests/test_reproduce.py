"""`tact reproduce --preset smoke`: the whole §3 experiment end to end, then a re-run that skips it all.

Every stage is real (phantoms, ODL/astra simulation, FBP tuning, BM3D, eight trainings,
inference, evaluation with the pre-trained segmenter); the smoke preset only makes it small.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from training.dataset import SimulatedDataset, volume_path
from training.methods import PSNR_TOLERANCE_DB, default_variant
from training.presets import PRESETS

TACT = Path(sys.executable).with_name("tact")
TRAINED = ["baseunet", "ta0.5", "joint0.5", "ta0.5-balanced", "ta0.5-weakg"]
LABELS = ["Low-dose", "FBP", "BM3D", "Base U-Net", "Task-adaptive α=0.5", "Joint training C=0.5",
          "Task-adaptive α=0.5, balanced", "Task-adaptive α=0.5, weakg", "Full-dose"]


def reproduce(out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(TACT), "-q", "reproduce", "--preset", "smoke", "--out", str(out), "--workers", "2"],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("reproduce") / "smoke"
    return out, reproduce(out)


def test_smoke_preset_matches_the_paper_methods():
    smoke = PRESETS["smoke"]
    assert ([f"ta{a:g}" for a in smoke.alphas] + [f"joint{c:g}" for c in smoke.cs]
            + [v.method for v in smoke.variants]) == TRAINED[1:]
    for name in ("cpu", "paper"):
        assert PRESETS[name].alphas == PRESETS[name].cs == (0.1, 0.5, 0.9)
    assert PRESETS["paper"].size == 512 and PRESETS["paper"].training.network.features == 64
    # The paper reconstructs in LoDoPaB's fixed 26 cm domain; the CPU presets in the patient's own.
    assert PRESETS["paper"].domain == "lodopab" and PRESETS["cpu"].domain == PRESETS["smoke"].domain == "physical"
    physical = PRESETS["paper"].with_simulation(domain="physical", photons=1024.0)
    assert (physical.domain, physical.photons, physical.angles) == ("physical", 1024.0, PRESETS["paper"].angles)


def test_every_stage_ran_and_the_report_is_complete(run):
    out, result = run
    report = out / "report"
    for label in LABELS:
        assert f"| {label} |" in (report / "table_reconstruction.md").read_text(), label
        assert f"| {label} |" in (report / "table_dice.md").read_text(), label
    figures = {p.name for p in (report / "figures").iterdir()}
    assert "training_curves.png" in figures
    assert any(name.startswith("reconstructions_") for name in figures)
    assert any(name.startswith("segmentations_") for name in figures)
    for stage in ["segmentation", "segmentation-weakg", *TRAINED]:
        assert (out / "models" / stage / "best.pt").is_file(), stage
    dataset = SimulatedDataset(out / "dataset")
    for method in TRAINED:
        assert dataset.has_method(method)
        assert dataset.methods[method]["checkpoint"] == str((out / "models" / method / "best.pt").resolve())
    cost = json.loads((out / "cost.json").read_text())
    expected_stages = {"data", "simulate", "fbp", "bm3d", "segmentation", "segmentation-weakg", *TRAINED, "evaluate",
                       "statistics", *(f"reconstruct {m}" for m in TRAINED)}
    assert set(cost["stages"]) == expected_stages
    assert all(seconds > 0 for seconds in cost["stages"].values())
    assert "compute cost:" in result.stdout and "| **total** |" in (report / "compute_cost.md").read_text()


def test_dice_table_summarises_the_per_slice_metrics(run):
    out, _ = run
    with open(out / "report" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = (out / "report" / "table_dice.md").read_text()
    for method, label in (("lowdose", "Low-dose"), ("ta0.5", "Task-adaptive α=0.5"), ("fulldose", "Full-dose")):
        values = np.asarray([float(r["dice_slice_eq7"]) for r in rows if r["method"] == method])
        assert values.size == len(SimulatedDataset(out / "dataset").slices("test"))
        assert np.all((values >= 0) & (values <= 1))
        assert f"| {label} | {values.mean():.4f} ± {values.std():.4f} |" in table, (label, table)
    assert (out / "report" / "dice_volume.csv").is_file()


def test_a_second_run_skips_every_finished_stage(run):
    out, _ = run
    models = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("best.pt")}
    volumes = {p: p.stat().st_mtime_ns for p in (out / "dataset").rglob("*.nii")}
    again = reproduce(out)
    assert {p: p.stat().st_mtime_ns for p in (out / "models").rglob("best.pt")} == models
    assert {p: p.stat().st_mtime_ns for p in (out / "dataset").rglob("*.nii")} == volumes
    table = (out / "report" / "compute_cost.md").read_text()
    assert table.count("already done") == len(models) + len(TRAINED) + 4  # trainings, reconstructions, data/simulate/fbp/bm3d
    assert "compute cost:" in again.stdout


def test_other_simulation_settings_for_a_finished_run_folder_are_refused(run):
    """A finished data set would otherwise be reused silently under the new settings."""
    out, _ = run
    manifest = out / "dataset" / "dataset.json"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for option, value, shown in (("--domain", "lodopab", "domain physical (asked: lodopab)"),
                                 ("--photons", "1000", "photons 300 (asked: 1000)")):
        result = subprocess.run([str(TACT), "-q", "reproduce", "--preset", "smoke", "--out", str(out), option, value],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"tact: error: {manifest}: this run's data set was simulated with {shown}"), result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.network
def test_export_models_writes_a_model_folder_with_its_card(run, sample_cache, tmp_path):
    """`tact export-models`: the chosen models byte for byte, serving.json, and a card with the served check."""
    out, _ = run
    models = tmp_path / "model"
    # an earlier export's model, trained with another g: no longer served after this export
    models.mkdir()
    (models / "ta0.9.pt").write_bytes((out / "models" / "ta0.5" / "best.pt").read_bytes())
    (models / "serving.json").write_text(json.dumps({"default_variant": "ta0.9", "models": ["segmentation", "ta0.9"]}))
    result = subprocess.run([str(TACT), "-q", "export-models", str(out), "--out", str(models),
                             "--data", str(tmp_path / "serve")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # by default every model the run trained, byte for byte
    trained = ["segmentation", "baseunet", "joint0.5", "ta0.5"]
    for name in trained:
        assert (models / f"{name}.pt").read_bytes() == (out / "models" / name / "best.pt").read_bytes()
    assert sorted(p.stem for p in models.glob("*.pt")) == sorted(trained)
    serving = json.loads((models / "serving.json").read_text())
    # ta0.5 is the only task-adaptive model: the default whatever its PSNR
    assert serving["default_variant"] == "ta0.5" and serving["models"] == trained
    card = (models / "MODEL_CARD.md").read_text()
    for text in ("| `segmentation.pt` | segmentation |", "| `ta0.5.pt` | reconstruction | α = 0.5 |",
                 "| served `ta0.5` (default) |", "| served `baseunet` |", "| served `joint0.5` |", "| Hann FBP |", "Not for clinical use"):
        assert text in card, text
    assert f"served on the real sample (3)" in result.stdout
    # the demo studies were simulated at the models' settings, the sample a test patient
    studies = SimulatedDataset(tmp_path / "serve" / "dataset")
    assert studies.settings["size"] == PRESETS["smoke"].size and studies.settings["num_angles"] == PRESETS["smoke"].angles
    assert studies.case_ids("test") == ["3"] and studies.case_ids("train") == ["0", "1", "2"]

    refused = subprocess.run([str(TACT), "export-models", str(out), "--out", str(tmp_path / "other"), "--models",
                              "segmentation,ta0.9"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "no such model file(s)" in refused.stderr and "ta0.9" in refused.stderr
    assert not (tmp_path / "other").exists()
    # a model file that no export wrote is never overwritten or served beside the export: refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.pt").write_bytes(b"a user's model")
    refused = subprocess.run([str(TACT), "export-models", str(out), "--out", str(foreign)], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "holds model files that no export wrote (mine.pt)" in refused.stderr
    assert [p.name for p in foreign.iterdir()] == ["mine.pt"]


def test_the_default_variant_is_the_best_task_adaptive_dice_that_stays_within_a_decibel_of_the_best_image():
    metrics = {"baseunet": {"val_psnr": 32.0, "val_dice_volume": 0.40},
               "ta0.01": {"val_psnr": 31.6, "val_dice_volume": 0.45},
               "ta0.03": {"val_psnr": 31.1, "val_dice_volume": 0.47},
               "ta0.1": {"val_psnr": 29.5, "val_dice_volume": 0.50},
               "joint0.1": {"val_psnr": 31.9, "val_dice_volume": 0.60}}
    assert PSNR_TOLERANCE_DB == 1.0
    assert default_variant(metrics) == "ta0.03"  # ta0.1 is better at Dice but 2.5 dB below the best image
    metrics["ta0.03"]["val_psnr"] = 30.9
    assert default_variant(metrics) == "ta0.01"
    # no task-adaptive model close enough: the one with the best Dice among them all the same
    assert default_variant({"baseunet": {"val_psnr": 32.0}, "ta0.5": {"val_psnr": 25.0, "val_dice_volume": 0.4},
                            "ta0.9": {"val_psnr": 15.0, "val_dice_volume": 0.5}}) == "ta0.9"


def test_the_cpu_preset_adds_the_second_real_patient_and_refuses_a_run_folder_without_it(tmp_path):
    """A run folder whose data stage wrote other patients (e.g. before example_ct joined the preset) is not reused."""
    from training.errors import DataError
    from training.presets import PRESETS
    from training.reproduce import Reproduction

    reproduction = Reproduction(PRESETS["cpu"], tmp_path / "run")
    record = reproduction._data_record("16")
    assert record == {"phantoms": 16, "sample_case": "16", "real_patients": {"17": "example_ct"}}
    assert Reproduction(PRESETS["demo-models"], tmp_path / "demo")._data_record("16") == {"phantoms": 16, "sample_case": "16"}
    marker = tmp_path / "run" / "lits" / ".complete"
    assert not reproduction._data_written("16")
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"phantoms": 16, "sample_case": "16"}))
    with pytest.raises(DataError, match="use a new --out"):
        reproduction._data_written("16")
    marker.write_text(json.dumps(record))
    assert reproduction._data_written("16")


def test_a_run_folder_is_continued_only_by_a_preset_with_the_same_data_g_and_training(tmp_path):
    """cpu-seeds continues a cpu run (its seed 0 is the cpu run's); demo-models, of other data and g, may not."""
    from dataclasses import replace

    from training.errors import DataError
    from training.reproduce import Reproduction

    cpu, seeds = PRESETS["cpu"], PRESETS["cpu-seeds"]
    assert seeds.shares_stages_with(cpu) and cpu.shares_stages_with(seeds)
    assert (seeds.seeds, seeds.training, seeds.config("segmentation")) == (3, cpu.training, cpu.config("segmentation"))
    assert not PRESETS["demo-models"].shares_stages_with(cpu)
    assert not replace(cpu, segmentation_epochs=79).shares_stages_with(cpu)
    run = tmp_path / "run"
    run.mkdir()
    (run / "cost.json").write_text(json.dumps({"preset": "cpu", "stages": {"data": 1.0}}))
    assert Reproduction(seeds, run)._recorded == {"data": 1.0}
    with pytest.raises(DataError, match="holds a reproduction with preset 'cpu', not 'demo-models'"):
        Reproduction(PRESETS["demo-models"], run)


def test_each_variant_trains_with_the_options_it_names(run):
    """The smoke preset's variants: the normalised loss and warm start from the Base U-Net, and
    interpolation up-sampling under a g of its own trained for one epoch."""
    out, _ = run
    models = out / "models"
    config = {name: yaml.safe_load((models / name / "config.yaml").read_text()) for name in
              ("ta0.5", "ta0.5-balanced", "ta0.5-weakg", "segmentation", "segmentation-weakg")}
    base = str(models / "baseunet" / "best.pt")
    assert (config["ta0.5"]["init_checkpoint"], config["ta0.5"]["loss_reference"]) == (None, None)
    assert (config["ta0.5-balanced"]["init_checkpoint"], config["ta0.5-balanced"]["loss_reference"]) == (base, base)
    assert config["ta0.5-balanced"]["network"]["upsample"] == config["ta0.5"]["network"]["upsample"] == "transposed"
    assert config["ta0.5-weakg"]["network"]["upsample"] == "interpolation"
    assert config["ta0.5-weakg"]["segmenter_checkpoint"] == str(models / "segmentation-weakg" / "best.pt")
    assert config["ta0.5-balanced"]["segmenter_checkpoint"] == str(models / "segmentation" / "best.pt")
    assert (config["segmentation-weakg"]["epochs"], config["segmentation"]["epochs"]) == (1, PRESETS["smoke"].segmentation_epochs)
    inputs = json.loads((models / "ta0.5-balanced" / "inputs.json").read_text())
    scales = inputs["loss_reference"]["scales"]
    assert set(scales) == {"mse", "dice_loss"} and all(value > 0 for value in scales.values())


def test_further_seeds_retrain_every_method_on_the_same_slices_and_give_statistics(run):
    """`--seeds 2` on a finished run: seed 0 is kept, seed 1 trains everything again with training
    seed + 1 on a hard-linked copy of the data set, and the statistics cover both seeds."""
    out, _ = run
    seed0 = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("best.pt")}
    result = subprocess.run([str(TACT), "-q", "reproduce", "--preset", "smoke", "--out", str(out), "--workers", "2",
                             "--seeds", "2"], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "models").rglob("best.pt")} == seed0
    seed1 = out / "seeds" / "1"
    for stage in ["segmentation", "segmentation-weakg", *TRAINED]:
        config = yaml.safe_load((seed1 / "models" / stage / "config.yaml").read_text())
        assert config["seed"] == PRESETS["smoke"].training.seed + 1, stage
        if config.get("segmenter_checkpoint"):
            assert Path(config["segmenter_checkpoint"]).parent.parent == seed1 / "models", stage  # seed 1's own g
        assert (seed1 / "models" / stage / "best.pt").read_bytes() != (out / "models" / stage / "best.pt").read_bytes()
    # the slices, references and baselines are the first seed's files; the reconstructions are seed 1's own
    first, second = SimulatedDataset(out / "dataset"), SimulatedDataset(seed1 / "dataset")
    case = first.case_ids("test")[0]
    for method in ("lowdose", "fulldose", "final", "fbp", "bm3d"):
        assert volume_path(first.root, method, case).stat().st_ino == volume_path(second.root, method, case).stat().st_ino
    for method in TRAINED:
        assert second.methods[method]["checkpoint"] == str((seed1 / "models" / method / "best.pt").resolve())
        assert volume_path(first.root, method, case).stat().st_ino != volume_path(second.root, method, case).stat().st_ino
    # per seed: the mean over test patients of each patient's mean PSNR, from that seed's own metrics.csv
    record = json.loads((out / "report" / "statistics.json").read_text())
    assert record["seeds"] == 2 and sorted(record["patients"]) == sorted(first.case_ids("test"))
    for k, report in enumerate((out / "report", seed1 / "report")):
        with open(report / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        for method in ("fbp", "ta0.5-balanced"):
            per_patient = [np.mean([float(r["psnr"]) for r in rows if r["method"] == method and r["case"] == c])
                           for c in record["patients"]]
            assert record["per_seed"][method]["psnr"][k] == pytest.approx(np.mean(per_patient), abs=1e-9)
    assert record["per_seed"]["fbp"]["psnr"][0] == pytest.approx(record["per_seed"]["fbp"]["psnr"][1], abs=1e-9)
    assert record["per_seed"]["baseunet"]["psnr"][0] != record["per_seed"]["baseunet"]["psnr"][1]
    statistics = (out / "report" / "statistics.md").read_text()
    assert "2 seed(s)" in statistics and "| Task-adaptive α=0.5, balanced vs Base U-Net |" in statistics
    assert statistics in result.stdout
    cost = (out / "report" / "compute_cost.md").read_text()
    assert "| seed 1: segmentation |" in cost and "| seed 1: dataset |" in cost and "| statistics |" in cost


def test_evaluate_with_a_segmenter_writes_the_statistics_of_its_report(run, tmp_path):
    out, _ = run
    report = tmp_path / "report"
    methods = ["lowdose", "bm3d", "baseunet", "ta0.5-balanced", "fulldose"]
    result = subprocess.run([str(TACT), "-q", "evaluate", "--dataset", str(out / "dataset"), "--methods", ",".join(methods),
                             "--segmenter", str(out / "models" / "segmentation" / "best.pt"), "--out", str(report),
                             "--figures", "0", "--workers", "2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((report / "statistics.json").read_text())
    assert record["seeds"] == 1 and set(record["estimates"]) == set(methods)
    with open(report / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    per_patient = [np.mean([float(r["psnr"]) for r in rows if r["method"] == "bm3d" and r["case"] == c])
                   for c in record["patients"]]
    assert record["estimates"]["bm3d"]["psnr"][0] == pytest.approx(np.mean(per_patient), abs=1e-9)
    assert {(t["method"], t["reference"]) for t in record["tests"]} == {("ta0.5-balanced", "baseunet"), ("ta0.5-balanced", "bm3d")}
    assert "statistics.md" in result.stdout


@pytest.mark.parametrize("options, message", [
    (dict(tag="Balanced", alpha=0.5), "variant tag"),
    (dict(tag="x", alpha=1.5), r"alpha must be in \[0, 1\]"),
    (dict(tag="x", alpha=0.0, normalised=True), "no Dice term"),
    (dict(tag="x", alpha=0.0, segmentation_epochs=4), "does not use g"),
    (dict(tag="x", alpha=0.5, warm_start=True, upsample="interpolation"), "whose up-sampling is transposed"),
    (dict(tag="x", alpha=0.5, upsample="pixelshuffle"), "upsample must be one of"),
    (dict(tag="x", alpha=0.5, segmentation_epochs=0), "at least 1"),
])
def test_variants_that_cannot_train_are_refused(options, message):
    from training.presets import Variant

    with pytest.raises(ValueError, match=message):
        Variant(**options)


def test_variant_methods_and_their_own_g_stages_must_not_collide():
    from dataclasses import replace

    from training.presets import Variant

    assert Variant("warm", 0.0, warm_start=True).method == "baseunet-warm"
    with pytest.raises(ValueError, match="a method name of its own"):
        replace(PRESETS["smoke"], variants=(Variant("a", 0.5), Variant("a", 0.5, normalised=True)))
    with pytest.raises(ValueError, match="must agree on segmentation_epochs"):
        replace(PRESETS["smoke"], variants=(Variant("a", 0.5, segmentation_epochs=1), Variant("a", 0.1, segmentation_epochs=2)))
    replace(PRESETS["smoke"], variants=(Variant("a", 0.5, segmentation_epochs=1), Variant("a", 0.1, segmentation_epochs=1)))
