"""The training engine through `tact train`: resume after a real kill, torchrun on 2 processes,
early stopping and the learning-rate schedule, and bad input refused before training.

Everything is real: a phantom data set simulated with ODL/astra at 64 px, narrow U-Nets,
subprocesses killed with SIGKILL, and torchrun with the gloo backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from monai.utils import set_determinism

from training.checkpoints import load_reconstructor, load_segmenter, read_model
from training.config import load_config
from training.dataset import SimulatedDataset
from training.engine import read_history, read_summary, train, validation_cases
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
        assert row["val_loss"] == pytest.approx(0.5 * row["val_mse"] + 0.5 * row["val_dice"], rel=1e-4)
        assert row["score"] == pytest.approx(-row["val_loss"])
        assert 0.0 <= row["val_dice_score"] <= 1.0 and row["val_psnr"] > 0
    summary = read_summary(run)
    best = max(history, key=lambda row: row["score"])
    assert summary.best_epoch == best["epoch"] and summary.epochs == 3 and summary.fit_slices > 0
    model = read_model(run / "best.pt")
    assert model.task == "reconstruction" and model.weight == 0.5 and model.epoch == best["epoch"]
    assert model.metrics["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    f, _ = load_reconstructor(run / "best.pt")
    assert not f.training
    # The validation patients are training-split patients, never test ones.
    dataset = SimulatedDataset(data)
    held_out = validation_cases(dataset.case_ids("train"), 0.34, 0)
    assert held_out and set(held_out) < set(dataset.case_ids("train"))
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


def test_killed_run_resumes_to_the_same_weights(data, tmp_path):
    args = ["train", "segmentation", "--dataset", str(data), "epochs=25", "batch_size=2", "early_stopping_patience=100", *TINY]
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
    assert 3 <= done < 25 and read_summary(killed) is None

    resumed = tact(*args, "--out", str(killed))
    assert "25 epoch(s)" in resumed.stdout
    assert [row["epoch"] for row in read_history(killed)] == list(range(1, 26))
    _assert_same_weights(_weights(killed / "best.pt", "segmenter"), _weights(reference / "best.pt", "segmenter"))
    last_reference = torch.load(reference / "last.pt", weights_only=True)
    last_resumed = torch.load(killed / "last.pt", weights_only=True)
    _assert_same_weights(last_resumed["modules"]["segmenter"], last_reference["modules"]["segmenter"])
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
    ("reconstruction", ["--alpha", "0.5", "--segmenter", "SEGMENTER"], ["network.features=8"],
     "the segmentation network was trained with features=4"),
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
