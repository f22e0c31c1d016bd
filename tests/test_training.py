"""The training engine through `tact train`: resume after a real kill, torchrun on 2 processes,
early stopping and the learning-rate schedule, and bad input refused before training.

Everything is real: a phantom data set simulated with ODL/astra at 64 px, narrow U-Nets,
subprocesses killed with SIGKILL, and torchrun with the gloo backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.utils import set_determinism

from training.checkpoints import load_reconstructor, load_segmenter, read_model
from training.config import load_config
from training.dataset import SimulatedDataset
from training.engine import read_history, read_summary, train, validation_cases
from training.losses import TaskWeightedLoss
from training.networks import UNetConfig, build_reconstruction_net, build_segmentation_net
from training.phantom import write_phantom_dataset
from training.simulate import SimulationSettings, simulate_dataset

TACT = Path(sys.executable).with_name("tact")
TINY = ["network.features=4", "network.depth=2", "num_workers=0", "validation_fraction=0.34"]


def tact(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(TACT), "-q", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"tact {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Five phantom patients at 64 px: three to fit, one to validate, one to test."""
    root = tmp_path_factory.mktemp("training")
    write_phantom_dataset(root / "lits", 5, size=64, slices=8, seed=11, progress=False)
    settings = SimulationSettings(photons=300, num_angles=64, size=64, seed=2)
    simulate_dataset(root / "lits", root / "dataset", settings, workers=2, progress=False)
    return root / "dataset"


@pytest.fixture(scope="module")
def segmenter(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("segmenter")
    tact("train", "segmentation", "--dataset", str(data), "--out", str(run), "epochs=2", "batch_size=4", *TINY)
    return run / "best.pt"


def _weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    return read_model(path).state[name]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_run_folder_contents_and_model_files(data, segmenter, tmp_path):
    run = tmp_path / "ta"
    out = tact("train", "reconstruction", "--alpha", "0.5", "--segmenter", str(segmenter), "--dataset", str(data),
               "--out", str(run), "epochs=3", "batch_size=4", *TINY).stdout
    assert f"{run}: 3 epoch(s)" in out
    for name in ("config.yaml", "best.pt", "last.pt", "history.csv", "summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    history = read_history(run)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    # The objective is the weighted sum of its parts, and the validation score is its negative.
    for row in history:
        assert row["val_loss"] == pytest.approx(0.5 * row["val_mse"] + 0.5 * row["val_dice_loss"], rel=1e-4)
        assert row["score"] == pytest.approx(-row["val_loss"])
        assert row["val_psnr"] > 0
        for convention in ("volume", "slice_eq7", "slice_present"):
            assert 0.0 <= row[f"val_dice_{convention}"] <= 1.0
            assert 0.0 <= row[f"val_dice_{convention}_liver"] <= 1.0
        # eq. 7 counts a class absent from both maps as 1: never below the present-classes mean
        assert row["val_dice_slice_eq7"] >= row["val_dice_slice_present"] - 1e-9
    summary = read_summary(run)
    best = max(history, key=lambda row: row["score"])
    assert summary.best_epoch == best["epoch"] and summary.epochs == 3 and summary.fit_slices > 0
    assert summary.selection == {"metric": "val_loss", "mode": "min", "threshold": 1e-3,
                                 "best_value": pytest.approx(best["val_loss"], rel=1e-5)}
    model = read_model(run / "best.pt")
    assert model.task == "reconstruction" and model.weight == 0.5 and model.epoch == best["epoch"]
    assert model.metrics["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    f, _ = load_reconstructor(run / "best.pt")
    assert not f.training
    # The validation patients the engine recorded are training-split patients, never test ones.
    dataset = SimulatedDataset(data)
    split = json.loads((run / "summary.json").read_text())["split"]
    # The model file records the imaging settings of exactly the patients it saw.
    imaging = model.imaging
    assert model.version == 2
    assert (imaging["slice_size"], imaging["photons"], imaging["angles"], imaging["domain"], imaging["input"]) == (
        64, 300.0, 64, "physical", "lowdose")
    spacings = [dataset.cases[c]["pixel_spacing_mm"][0] for c in split["fit"] + split["validation"]]
    assert imaging["pixel_spacing_mm"]["min"] == pytest.approx(min(spacings))
    assert imaging["pixel_spacing_mm"]["max"] == pytest.approx(max(spacings))
    assert imaging["field_of_view_mm"]["max"] == pytest.approx(64 * max(spacings))
    assert sorted(imaging["data"]["cases"]) == sorted(split["fit"] + split["validation"])
    low, median, high = imaging["input_hu_percentiles"]
    assert -3100 < low < median < high < 3100
    assert split["validation"] and split["fit"]
    assert sorted(split["fit"] + split["validation"]) == sorted(dataset.case_ids("train"))
    assert not set(split["validation"]) & set(dataset.case_ids("test"))
    assert not set(split["fit"]) & set(split["validation"])
    assert split["validation_slices"] == sum(dataset.cases[c]["num_slices"] for c in split["validation"])
    inputs = json.loads((run / "inputs.json").read_text())
    assert inputs["dataset"]["path"] == str(data.resolve())
    assert inputs["segmenter"] == {"path": str(segmenter.resolve()), "sha256": hashlib.sha256(segmenter.read_bytes()).hexdigest()}
    # A finished run is not trained again.
    again = tact("train", "reconstruction", "--alpha", "0.5", "--segmenter", str(segmenter), "--dataset", str(data),
                 "--out", str(run), "epochs=3", "batch_size=4", *TINY)
    assert (run / "best.pt").stat().st_mtime_ns == model.path.stat().st_mtime_ns
    assert "3 epoch(s)" in again.stdout


def test_task_adaptive_model_holds_f_only_and_joint_training_changes_g(data, segmenter, tmp_path):
    tact("train", "reconstruction", "--alpha", "0.9", "--segmenter", str(segmenter), "--dataset", str(data),
         "--out", str(tmp_path / "ta"), "epochs=2", "batch_size=4", *TINY)
    assert set(read_model(tmp_path / "ta" / "best.pt").state) == {"reconstructor"}  # g is not part of the model
    tact("train", "joint", "--c", "0.5", "--segmenter", str(segmenter), "--dataset", str(data),
         "--out", str(tmp_path / "joint"), "epochs=2", "batch_size=4", *TINY)
    joint = read_model(tmp_path / "joint" / "best.pt")
    assert set(joint.state) == {"reconstructor", "segmenter"}
    pretrained = _weights(segmenter, "segmenter")
    changed = [k for k in pretrained if "weight" in k and not torch.equal(pretrained[k], joint.state["segmenter"][k])]
    assert changed, "joint training must change g"
    assert load_segmenter(tmp_path / "joint" / "best.pt") is not None


@pytest.mark.parametrize("task, flags, epochs", [
    ("segmentation", ["augment=true"], 25),  # the augmentation, seeded per slice and epoch, resumes too
    ("reconstruction", ["--alpha", "0.5", "--segmenter", "SEGMENTER"], 12),
    ("joint", ["--c", "0.5", "--segmenter", "SEGMENTER"], 12),
])
def test_killed_run_resumes_to_the_same_weights(data, segmenter, tmp_path, task, flags, epochs):
    flags = [str(segmenter) if flag == "SEGMENTER" else flag for flag in flags]
    args = ["train", task, *flags, "--dataset", str(data), f"epochs={epochs}", "batch_size=2",
            "early_stopping_patience=100", *TINY]
    reference = tmp_path / "reference"
    tact(*args, "--out", str(reference))

    killed = tmp_path / "killed"
    process = subprocess.Popen([str(TACT), "-q", *args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (killed / "history.csv").is_file() and len(read_history(killed)) >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = torch.load(killed / "last.pt", weights_only=True)["trainer"]["epoch"]
    assert 3 <= done < epochs and read_summary(killed) is None

    resumed = tact(*args, "--out", str(killed))
    assert f"{epochs} epoch(s)" in resumed.stdout
    assert [row["epoch"] for row in read_history(killed)] == list(range(1, epochs + 1))
    best_reference, best_resumed = read_model(reference / "best.pt"), read_model(killed / "best.pt")
    assert best_reference.state.keys() == best_resumed.state.keys()
    for name in best_reference.state:  # the reconstructor, the segmenter, or both (joint)
        _assert_same_weights(best_resumed.state[name], best_reference.state[name])
    last_reference = torch.load(reference / "last.pt", weights_only=True)
    last_resumed = torch.load(killed / "last.pt", weights_only=True)
    for name in last_reference["modules"]:
        _assert_same_weights(last_resumed["modules"][name], last_reference["modules"][name])
    assert read_summary(killed).best_epoch == read_summary(reference).best_epoch


def test_torchrun_on_two_processes_matches_one_process(data, tmp_path):
    """2 processes x batch 2 take the same steps as 1 process x batch 4, up to floating-point noise.

    The noise floor is measured in the same test: one process with 1 thread against one with
    2 threads (Adam turns rounding differences in near-zero gradients into visible weight
    differences). Instance norm, because gloo has no synchronised batch norm.
    """
    common = ["--dataset", str(data), "epochs=1", "network.norm=instance", "network.features=4", "network.depth=2",
              "num_workers=0", "validation_fraction=0.34"]
    dataset = SimulatedDataset(data)
    held_out = validation_cases(dataset.case_ids("train"), 0.34, 0)
    fit_slices = sum(dataset.cases[c]["num_slices"] for c in dataset.case_ids("train") if c not in held_out)
    assert fit_slices % 2 == 0, "an odd count would make the sampler pad one process's share"
    runs = {}
    for name, threads in (("one", "1"), ("threads", "2")):
        tact("train", "joint", "--c", "0.5", *common, "--out", str(tmp_path / name), "batch_size=4",
             env=dict(os.environ, OMP_NUM_THREADS=threads))
        runs[name] = read_model(tmp_path / name / "best.pt").state
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training.cli", "-q",
         "train", "joint", "--c", "0.5", *common, "--out", str(tmp_path / "two"), "batch_size=2"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_summary(tmp_path / "two").world_size == 2
    runs["two"] = read_model(tmp_path / "two" / "best.pt").state
    set_determinism(seed=0)  # the engine's initialisation: f, then g, from the run's seed
    network = UNetConfig(features=4, depth=2, norm="instance")
    runs["init"] = {"reconstructor": build_reconstruction_net(network).state_dict(),
                    "segmenter": build_segmentation_net(network).state_dict()}

    def differences(a: str, b: str) -> torch.Tensor:
        return torch.cat([(runs[a][net][k] - runs[b][net][k]).abs().flatten() for net in runs[a] for k in runs[a][net]])

    distributed, floor, moved = differences("one", "two"), differences("one", "threads"), differences("one", "init")
    assert moved.median() > 1e-3, "training moved the weights"
    assert distributed.quantile(0.9) <= 3 * floor.quantile(0.9) + 1e-7
    assert distributed.median() < 0.05 * moved.median()
    for a, b in zip(read_history(tmp_path / "one"), read_history(tmp_path / "two")):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_learning_rate_schedule_and_early_stopping(data, tmp_path):
    """With a negligible learning rate (and no batch-norm statistics to drift) nothing improves
    after epoch 1: the schedule halves the rate after every epoch without improvement
    (lr_patience 0) and training stops after early_stopping_patience such epochs."""
    config = load_config(overrides=["task=segmentation", "epochs=20", "learning_rate=1e-7", "lr_patience=0",
                                    "early_stopping_patience=3", "batch_size=8", *TINY, "network.norm=instance"])
    summary = train(config, data, tmp_path / "run", device="cpu", progress=False)
    history = read_history(tmp_path / "run")
    assert summary.stopped_early and summary.epochs == 4 and summary.best_epoch == 1
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert [row["lr"] for row in history] == pytest.approx([1e-7, 1e-7, 5e-8, 2.5e-8])


@pytest.mark.parametrize("task, flags, overrides, message", [
    ("reconstruction", ["--alpha", "1.5"], [], "weight (alpha) must be in [0, 1], got 1.5"),
    ("joint", ["--c", "-0.1"], [], "weight (C) must be in [0, 1], got -0.1"),
    ("reconstruction", ["--alpha", "0.5"], [], "alpha = 0.5 needs the pre-trained segmentation network"),
    ("segmentation", [], ["epochz=3"], "unknown config key 'epochz'"),
    ("joint", ["--c", "0.5", "--segmenter", "SEGMENTER"], ["network.features=8"],
     "the segmentation network was trained with features=4"),
    ("reconstruction", ["--alpha", "0.5"], ["augment=true"], "augment is for the segmentation pre-training"),
    ("reconstruction", ["--alpha", "0.5", "--segmenter", "RECONSTRUCTOR"], [], "without a segmentation network"),
    ("segmentation", [], ["network.depth=7"], "cannot be down-sampled 7 times"),
])
def test_bad_input_is_refused_before_training(data, segmenter, tmp_path, task, flags, overrides, message):
    if "RECONSTRUCTOR" in flags:
        tact("train", "reconstruction", "--dataset", str(data), "--out", str(tmp_path / "base"), "epochs=1", *TINY)
    files = {"SEGMENTER": str(segmenter), "RECONSTRUCTOR": str(tmp_path / "base" / "best.pt")}
    flags = [files.get(flag, flag) for flag in flags]
    result = tact("train", task, *flags, "--dataset", str(data), "--out", str(tmp_path / "run"), *TINY, *overrides, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists(), "nothing is written before the input is checked"


def test_data_set_without_training_slices_is_refused(tmp_path):
    write_phantom_dataset(tmp_path / "lits", 1, size=64, slices=4, seed=1, progress=False)
    simulate_dataset(tmp_path / "lits", tmp_path / "one", SimulationSettings(photons=300, num_angles=32, size=64),
                     workers=1, progress=False)
    result = tact("train", "segmentation", "--dataset", str(tmp_path / "one"), "--out", str(tmp_path / "run"),
                  "validation_fraction=0", check=False)
    assert result.returncode == 2 and "the training split holds no slices" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def _scaled_loss(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    """Multiply the reconstruction objective by ``factor`` (training and validation alike).

    A power of two scales every gradient exactly, and Adam's update is invariant to the
    scale (up to its epsilon), so the runs take the same steps and only the loss values
    differ by the factor.
    """
    original = TaskWeightedLoss.terms

    def terms(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out["loss"] = out["loss"] * factor
        return out

    monkeypatch.setattr(TaskWeightedLoss, "terms", terms)


def test_model_selection_does_not_depend_on_the_loss_scale(data, tmp_path, monkeypatch):
    """Two Base U-Net runs whose losses differ only by a factor of 1024 take the same
    decisions: the same improving epochs, learning-rate cuts and early stop."""
    # A 2% threshold makes this small run plateau within 60 epochs (0.1 s each).
    config = load_config(overrides=["task=reconstruction", "epochs=60", "batch_size=4", "learning_rate=3e-3",
                                    "lr_patience=0", "early_stopping_patience=3", "improvement_threshold=0.02", *TINY])
    runs = {}
    for factor in (1.0, 1024.0):
        with monkeypatch.context() as patch:
            _scaled_loss(patch, factor)
            summary = train(config, data, tmp_path / f"x{factor:g}", device="cpu", progress=False)
        runs[factor] = (summary, read_history(tmp_path / f"x{factor:g}"))
    (small, small_history), (large, large_history) = runs[1.0], runs[1024.0]
    # the scaling took effect: the monitored losses differ by the factor
    assert large_history[0]["val_loss"] == pytest.approx(1024 * small_history[0]["val_loss"], rel=1e-3)
    assert small_history[-1]["val_loss"] < 0.01  # an MSE, the scale at which an absolute threshold misjudges
    assert small.stopped_early and large.stopped_early, "the test needs a run that stops before its last epoch"
    assert small.epochs == large.epochs < 60
    assert small.best_epoch == large.best_epoch
    assert [row["lr"] for row in small_history] == [row["lr"] for row in large_history]
    assert small.selection["metric"] == "val_loss" and small.selection["threshold"] == 0.02


def _one_training_step(config, data) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """g's state before and after one real step of the engine (TrainingTask + TrainingStep in MONAI's trainer)."""
    from monai.engines import SupervisedTrainer
    from torch.utils.data import DataLoader

    from training.engine import TrainingStep, TrainingTask
    from training.slices import SliceDataset

    task = TrainingTask(config, torch.device("cpu"))
    g = task.objective.loss.segmenter
    before = {k: v.clone() for k, v in g.state_dict().items()}
    loader = DataLoader(SliceDataset(data, "train", task.input_method), batch_size=4, shuffle=False)
    optimizer = torch.optim.Adam(task.parameters(), lr=1e-3)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, epoch_length=1, train_data_loader=loader,
                                network=task.train_objective, optimizer=optimizer, loss_function=task.objective.loss,
                                iteration_update=TrainingStep(task), decollate=False)
    trainer.run()
    return before, {k: v.clone() for k, v in g.state_dict().items()}


def test_joint_training_updates_the_batch_norm_of_a_pretrained_g_and_task_adaptive_does_not(data, segmenter):
    """g loaded from --segmenter is in eval mode; a joint step must train it (batch-norm
    statistics included), a task-adaptive step must leave it bit-identical."""
    common = ["network.features=4", "network.depth=2", f"segmenter_checkpoint={str(segmenter)!r}"]
    before, after = _one_training_step(load_config(overrides=["task=joint", "weight=0.5", *common]), data)
    statistics = [k for k in before if k.endswith("running_mean") or k.endswith("running_var")]
    assert statistics, "the test needs batch-norm layers in g"
    assert all(not torch.equal(before[k], after[k]) for k in statistics), "joint training must update g's statistics"
    before, after = _one_training_step(load_config(overrides=["task=reconstruction", "weight=0.5", *common]), data)
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen g must not change at all"


def test_a_changed_segmenter_file_or_another_data_set_is_refused(data, segmenter, tmp_path):
    """A run records what it trains on; resuming or re-running it with a changed segmenter
    file or another data set is refused (exit 2, naming the file) and changes nothing."""
    g = tmp_path / "g.pt"
    g.write_bytes(segmenter.read_bytes())
    run = tmp_path / "run"
    args = ["train", "reconstruction", "--alpha", "0.5", "--segmenter", str(g), "--out", str(run), "epochs=1",
            "batch_size=4", *TINY]
    tact(*args, "--dataset", str(data))
    snapshot = {p: p.stat().st_mtime_ns for p in run.rglob("*")}

    other = tmp_path / "other"  # the same data with another split: another fingerprint
    shutil.copytree(data, other)
    manifest = json.loads((other / "dataset.json").read_text())
    manifest["split"]["train"], manifest["split"]["test"] = manifest["split"]["test"] + manifest["split"]["train"][:1], \
        manifest["split"]["train"][1:]
    (other / "dataset.json").write_text(json.dumps(manifest))
    result = tact(*args, "--dataset", str(other), check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"tact: error: {other.resolve()}: is not the data set the run in {run} was trained on")
    assert "Traceback" not in result.stderr

    model = torch.load(g, weights_only=True)
    model["epoch"] += 1  # any change to the file
    torch.save(model, g)
    result = tact(*args, "--dataset", str(data), check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"tact: error: {g.resolve()}: has changed since the run in {run} started")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == snapshot


def test_validation_dice_of_g_equals_the_evaluation_of_its_model_file(data, segmenter):
    """The Dice recorded at the best epoch (per volume and both per-slice conventions)
    is what the evaluation's path gives for the saved g on the recorded validation patients."""
    from training.inference import segment_images
    from training.metrics import dice_counts, dice_scores

    model = read_model(segmenter)
    split = json.loads((segmenter.parent / "summary.json").read_text())["split"]
    dataset = SimulatedDataset(data)
    refs = [ref for ref in dataset.slices("train") if ref.case in split["validation"]]
    maps = segment_images(load_segmenter(segmenter), np.stack([dataset.slice("fulldose", r) for r in refs]))
    counts = dice_counts(maps, np.stack([dataset.segmentation(r) for r in refs]), batch=True)
    for convention in ("volume", "slice_eq7", "slice_present"):
        per_class, mean = dice_scores(counts, convention, cases=[r.case for r in refs])
        assert model.metrics[f"val_dice_{convention}"] == pytest.approx(np.nanmean(mean), abs=1e-6), convention
        assert model.metrics[f"val_dice_{convention}_liver"] == pytest.approx(np.nanmean(per_class[:, 0]), abs=1e-6)
    assert read_summary(segmenter.parent).selection["metric"] == "val_dice_volume"


def test_a_warm_start_begins_from_the_weights_it_names_and_refuses_other_files(data, segmenter, tmp_path):
    """``--init`` (init_checkpoint): f starts as the named run's f, the run records the file, other files are refused."""
    from dataclasses import replace

    from training.engine import TrainingTask

    tact("train", "reconstruction", "--dataset", str(data), "--out", str(tmp_path / "base"), "epochs=1", *TINY)
    base = tmp_path / "base" / "best.pt"
    config = load_config(overrides=["task=reconstruction", "weight=0.5", *TINY, f"segmenter_checkpoint={str(segmenter)!r}",
                                    f"init_checkpoint={str(base)!r}"])
    warm = TrainingTask(config, torch.device("cpu")).objective.network.state_dict()
    _assert_same_weights(warm, _weights(base, "reconstructor"))
    cold = TrainingTask(replace(config, init_checkpoint=None), torch.device("cpu")).objective.network.state_dict()
    assert any(not torch.equal(cold[k], warm[k]) for k in warm if "weight" in k), "without --init f starts elsewhere"

    run = tmp_path / "warm"
    tact("train", "reconstruction", "--alpha", "0.5", "--segmenter", str(segmenter), "--init", str(base),
         "--dataset", str(data), "--out", str(run), "epochs=1", *TINY)
    inputs = json.loads((run / "inputs.json").read_text())
    assert inputs["init"] == {"path": str(base.resolve()), "sha256": hashlib.sha256(base.read_bytes()).hexdigest()}
    assert read_model(run / "best.pt").weight == 0.5

    notes = tmp_path / "notes.pt"
    notes.write_text("not weights")
    for task, flags, overrides, message in [
        ("reconstruction", ["--init", str(segmenter)], [], "without a reconstruction network"),
        ("reconstruction", ["--init", str(base)], ["network.features=8"], "the reconstruction network was trained with features=4"),
        ("reconstruction", ["--init", str(notes)], [], "not a TaskAdaptiveCT model file"),
        ("segmentation", [], [f"init_checkpoint={str(base)!r}"], "init_checkpoint (--init) starts a reconstruction network f"),
    ]:
        result = tact("train", task, *flags, "--dataset", str(data), "--out", str(tmp_path / "refused"), *TINY, *overrides,
                      check=False)
        assert result.returncode == 2 and message in result.stderr, (flags, result.stderr)
        assert not (tmp_path / "refused").exists(), "nothing is written before the input is checked"


def test_the_normalised_loss_measures_its_scales_on_the_validation_slices_and_refuses_what_it_cannot_use(data, segmenter, tmp_path):
    """``--normalise-with`` (loss_reference): the scales are the reference f's terms on the validation patients, under g."""
    from torch.utils.data import DataLoader

    from training.engine import TrainingTask
    from training.losses import term_scales
    from training.slices import SliceDataset

    tact("train", "reconstruction", "--dataset", str(data), "--out", str(tmp_path / "base"), "epochs=1", *TINY)
    base = tmp_path / "base" / "best.pt"
    run = tmp_path / "normalised"
    tact("train", "reconstruction", "--alpha", "0.5", "--segmenter", str(segmenter), "--normalise-with", str(base),
         "--dataset", str(data), "--out", str(run), "epochs=2", *TINY)
    inputs = json.loads((run / "inputs.json").read_text())
    assert inputs["loss_reference"]["sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()

    # The same measurement by hand: the Base U-Net's f on the run's validation patients, scored by the frozen g.
    config = load_config(run / "config.yaml")
    task = TrainingTask(config, torch.device("cpu"))
    held_out = json.loads((run / "summary.json").read_text())["split"]["validation"]
    slices = SliceDataset(SimulatedDataset(data), "train", task.input_method, cases=held_out)
    reference = load_reconstructor(base)[0]
    expected = term_scales(reference, task.objective.loss, (task.batch(b) for b in DataLoader(slices, batch_size=3)))
    assert inputs["loss_reference"]["scales"]["mse"] == pytest.approx(expected.mse, rel=1e-5)
    assert inputs["loss_reference"]["scales"]["dice_loss"] == pytest.approx(expected.dice_loss, rel=1e-5)
    # The logged validation loss is the normalised one: (1 - a) MSE / mse_ref + a Dice / dice_ref.
    last = read_history(run)[-1]
    scales = inputs["loss_reference"]["scales"]
    assert last["val_loss"] == pytest.approx(0.5 * last["val_mse"] / scales["mse"] + 0.5 * last["val_dice_loss"] / scales["dice_loss"],
                                             rel=1e-3)
    assert last["val_loss"] > 10 * (0.5 * last["val_mse"] + 0.5 * last["val_dice_loss"]) * 0 + 0.1, "not the plain loss's scale"

    for task_name, flags, message in [
        ("reconstruction", ["--alpha", "0", "--normalise-with", str(base)], "has only one term"),
        ("reconstruction", ["--alpha", "0.5", "--segmenter", str(segmenter), "--normalise-with", str(segmenter)],
         "without a reconstruction network"),
        ("segmentation", [f"loss_reference={str(base)!r}"], "has only one term"),
    ]:
        result = tact("train", task_name, *flags, "--dataset", str(data), "--out", str(tmp_path / "refused"), *TINY, check=False)
        assert result.returncode == 2 and message in result.stderr, (flags, result.stderr)
        assert not (tmp_path / "refused").exists()


def test_a_frozen_g_of_another_architecture_judges_a_narrow_f(data, segmenter, tmp_path):
    """Task-adaptive training takes g as its file describes it: here g is wider and deeper than f."""
    wide = tmp_path / "wide"
    tact("train", "segmentation", "--dataset", str(data), "--out", str(wide), "epochs=1", "batch_size=4", *TINY,
         "network.features=6", "network.depth=3")
    run = tmp_path / "f"
    tact("train", "reconstruction", "--alpha", "0.5", "--segmenter", str(wide / "best.pt"), "--dataset", str(data),
         "--out", str(run), "epochs=1", *TINY)
    assert read_model(run / "best.pt").network == UNetConfig(features=4, depth=2)
    assert "val_dice_volume" in read_history(run)[-1], "the wide g scored f's validation slices"
    # A g that cannot down-sample the slices is refused before training, naming it.
    deep = tmp_path / "deep.pt"
    from training.checkpoints import save_model

    save_model(deep, "segmentation", 0.0, UNetConfig(features=2, depth=7),
               {"segmenter": build_segmentation_net(UNetConfig(features=2, depth=7))}, 0, {})
    result = tact("train", "reconstruction", "--alpha", "0.5", "--segmenter", str(deep), "--dataset", str(data),
                  "--out", str(tmp_path / "refused"), *TINY, check=False)
    assert result.returncode == 2 and "cannot be down-sampled 7 times (the segmenter's network)" in result.stderr, result.stderr
