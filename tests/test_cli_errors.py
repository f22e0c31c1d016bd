"""Bad input to the real `tact` command: one line `tact: error: <file or option>: <problem>`, exit 2, nothing written.

Every test runs the installed `tact` as a subprocess, as a user would, and checks that the
refusal is the one line on stderr (no traceback), that the exit status is 2, and that no
file or folder was created, changed or removed in the folders the command was pointed at.
Small data (64 px phantoms, 64 angles, 300 photons) keep the module to about a minute.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from training.dataset import SimulatedDataset, volume_path
from training.evaluate import read_metrics_csv
from training.resources import GIB, demo_memory, phantom_memory, simulation_memory

TACT = Path(sys.executable).with_name("tact")
SIZE, ANGLES = 64, 64
SIM_ARGS = ["--size", str(SIZE), "--angles", str(ANGLES), "--seed", "3", "--photons", "300"]
# Not writable even as root: nothing can be created under /proc.
UNWRITABLE = Path("/proc/tact-test-out/x")


def tact(*args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    command = [str(TACT), *(["-q"] if quiet else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots`` (the roots too): folders by name, files with their size and modification time."""
    state: dict[str, tuple] = {}
    for root in roots:
        if not root.exists():
            state[str(root)] = ("absent",)
            continue
        for path in [root, *sorted(root.rglob("*"))]:
            info = path.lstat()
            state[str(path)] = ("dir",) if path.is_dir() else ("file", info.st_size, info.st_mtime_ns)
    return state


def assert_refused(result: subprocess.CompletedProcess, expected: str) -> str:
    """The refusal is one line starting with ``tact: error: `` and holding ``expected``; returns it."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tact: error: "), lines[0]
    assert expected in lines[0], lines[0]
    return lines[0]


def refuses(args: list[str], expected: str, watched: list[Path], quiet: bool = True) -> str:
    """Run ``tact args``, expect the refusal ``expected``, and that nothing under ``watched`` changed."""
    before = snapshot(*watched)
    line = assert_refused(tact(*args, quiet=quiet), expected)
    assert snapshot(*watched) == before, "the refused command wrote or changed files"
    return line


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """A LiTS folder of three phantoms and its simulated data set, shared by the module."""
    root = tmp_path_factory.mktemp("cli-errors")
    paths = {"root": root, "lits": root / "lits", "dataset": root / "dataset"}
    for args in (("phantom", "--out", str(paths["lits"]), "--volumes", "3", "--size", str(SIZE), "--slices", "8", "--seed", "5"),
                 ("simulate", "--lits", str(paths["lits"]), "--out", str(paths["dataset"]), "--workers", "2", *SIM_ARGS)):
        result = tact(*args)
        assert result.returncode == 0, result.stderr
    a_file = root / "a-file.txt"
    a_file.write_text("not a folder\n")
    paths["file"] = a_file
    return paths


@pytest.fixture(scope="module")
def unfinished(work) -> dict[str, Path]:
    """Copies of the data set as an interrupted `tact simulate` leaves them: a case missing, a case not complete."""
    variants = {}
    for name in ("missing", "not-complete"):
        folder = work["root"] / f"unfinished-{name}"
        shutil.copytree(work["dataset"], folder)
        manifest = json.loads((folder / "dataset.json").read_text())
        case = manifest["split"]["train"][0]
        if name == "missing":
            del manifest["cases"][case]
        else:
            manifest["cases"][case]["complete"] = False
        (folder / "dataset.json").write_text(json.dumps(manifest, indent=2))
        variants[name] = folder
    return variants


# 1. Options are checked before the data set is touched -------------------------------


@pytest.mark.parametrize("value", ["0", "2", "nan", "-0.5"])
def test_fbp_frequency_scaling_out_of_range_leaves_the_data_set_alone(work, value):
    refuses(["baseline", "fbp", "--dataset", str(work["dataset"]), "--frequency-scaling", value],
            f"tact: error: --frequency-scaling: must be in (0, 1], got {value}", [work["dataset"]])


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_bm3d_sigma_that_is_not_positive_and_finite_is_refused(work, value):
    refuses(["baseline", "bm3d", "--dataset", str(work["dataset"]), "--sigma-psd", value],
            f"tact: error: --sigma-psd: must be a positive finite number, got {value}", [work["dataset"]])


def test_baselines_check_their_parameter_before_writing(work, tmp_path):
    """The library functions too: run_fbp used to drop the manifest's fbp record before refusing."""
    from training.baselines import run_bm3d, run_fbp

    copy = tmp_path / "dataset"
    shutil.copytree(work["dataset"], copy)
    before = snapshot(copy)
    with pytest.raises(ValueError, match=r"frequency_scaling must be in \(0, 1\], got 2"):
        run_fbp(SimulatedDataset(copy), 2.0, workers=1, progress=False)
    with pytest.raises(ValueError, match="sigma_psd must be a positive finite number, got inf"):
        run_bm3d(SimulatedDataset(copy), float("inf"), workers=1, progress=False)
    assert snapshot(copy) == before


# 2. Photons and seeds are refused by name ------------------------------------------


@pytest.mark.parametrize("command", ["simulate", "demo"])
@pytest.mark.parametrize("value", ["inf", "nan", "0", "-5", "many"])
def test_photons_must_be_positive_and_finite(work, tmp_path, command, value):
    args = ["--lits", str(work["lits"]), "--out", str(tmp_path / "out")] if command == "simulate" else ["--out", str(tmp_path / "out")]
    refuses([command, *args, "--photons", value], f"tact: error: --photons: must be a positive finite number, got {value}",
            [tmp_path, work["lits"]])


@pytest.mark.parametrize("command", ["simulate", "demo", "phantom"])
def test_negative_seed_is_refused_by_name(work, tmp_path, command):
    args = {"simulate": ["--lits", str(work["lits"])], "demo": [], "phantom": ["--volumes", "1"]}[command]
    refuses([command, *args, "--out", str(tmp_path / "out"), "--seed", "-1"],
            "tact: error: --seed: must be a non-negative integer, got -1", [tmp_path, work["lits"]])


# 3. Sizes that cannot fit in memory ---------------------------------------------------


@pytest.mark.parametrize("command", ["simulate", "phantom", "demo"])
def test_size_beyond_the_machines_memory_is_refused_before_any_work(work, tmp_path, command):
    args = {"simulate": ["--lits", str(work["lits"])], "demo": [], "phantom": ["--volumes", "1"]}[command]
    line = refuses([command, *args, "--out", str(tmp_path / "out"), "--size", "100000"],
                   "tact: error: --size: needs about ", [tmp_path, work["lits"]])
    assert "GiB of memory" in line and "but this machine has" in line


def test_memory_estimates_admit_real_sizes_on_a_24_gib_machine():
    """512 px slices, 1000 angles, a few hundred slices per volume must not be refused for lack of memory."""
    assert phantom_memory(512, 300).total < 8 * GIB
    assert simulation_memory(512, 1000, 8, (512, 512, 300)).total < 16 * GIB
    assert simulation_memory(512, 1000, 8, (512, 512, 600)).total < 24 * GIB
    assert demo_memory(512, 1000, 8).total < 8 * GIB
    assert simulation_memory(100_000, 1000, 1, (512, 512, 20)).total > 1000 * GIB


# 4. Output folders that cannot be written ---------------------------------------------


def _out_commands(work: dict[str, Path]) -> dict[str, list[str]]:
    return {
        "simulate": ["simulate", "--lits", str(work["lits"]), *SIM_ARGS],
        "evaluate": ["evaluate", "--dataset", str(work["dataset"])],
        "phantom": ["phantom", "--volumes", "1", "--size", "64", "--slices", "2"],
        "demo": ["demo", "--size", "64", "--angles", "64"],
        "train": ["train", "segmentation", "--dataset", str(work["dataset"])],
    }


@pytest.mark.parametrize("command", ["simulate", "evaluate", "phantom", "demo", "train"])
def test_out_that_is_a_file_is_refused_before_any_work(work, command):
    args = _out_commands(work)[command]
    refuses([*args, "--out", str(work["file"])], f"tact: error: {work['file']}: is a file, not a folder",
            [work["root"]])


@pytest.mark.parametrize("command", ["simulate", "evaluate", "phantom", "demo"])
def test_out_below_a_file_is_refused(work, command):
    args = _out_commands(work)[command]
    out = work["file"] / "sub"
    refuses([*args, "--out", str(out)], f"tact: error: {out}: cannot be created: {work['file']} is a file, not a folder",
            [work["root"]])


@pytest.mark.parametrize("command", ["simulate", "evaluate", "phantom", "demo"])
def test_out_that_cannot_be_written_is_refused(work, command):
    args = _out_commands(work)[command]
    refuses([*args, "--out", str(UNWRITABLE)], f"tact: error: {UNWRITABLE}: cannot be written: ", [work["root"]])
    assert not UNWRITABLE.parent.exists()


# 5. Unfinished data sets --------------------------------------------------------------


@pytest.mark.parametrize("variant", ["missing", "not-complete"])
@pytest.mark.parametrize("command", ["train", "baseline", "evaluate"])
def test_unfinished_data_set_is_refused_with_how_to_finish_it(work, unfinished, tmp_path, variant, command):
    dataset = unfinished[variant]
    args = {
        "train": ["train", "segmentation", "--dataset", str(dataset), "--out", str(tmp_path / "run"), "--device", "cpu"],
        "baseline": ["baseline", "fbp", "--dataset", str(dataset)],
        "evaluate": ["evaluate", "--dataset", str(dataset), "--out", str(tmp_path / "report"), "--split", "all"],
    }[command]
    line = refuses(args, f"tact: error: {dataset}: unfinished data set (simulation incomplete): 2 of 3 cases done",
                   [dataset, tmp_path])
    assert "re-running the same `tact simulate` command" in line


# 6. Files that are not model files ------------------------------------------------------


@pytest.fixture(scope="module")
def not_models(work) -> dict[str, Path]:
    """A text file, and a .pt holding a pickled object of a class (what weights_only refuses)."""
    import argparse

    import torch

    folder = work["root"] / "not-models"
    folder.mkdir()
    text = folder / "notes.txt"
    text.write_text("these are not weights\n")
    pickled = folder / "pickled.pt"
    torch.save(argparse.Namespace(weights=[1, 2, 3]), pickled)
    return {"text": text, "pickled": pickled}


def _assert_no_unsafe_advice(line: str) -> None:
    for unsafe in ("weights_only", "arbitrary", "trust"):
        assert unsafe not in line, line


@pytest.mark.parametrize("kind", ["text", "pickled"])
def test_segmenter_that_is_not_a_model_file(work, not_models, tmp_path, kind):
    path = not_models[kind]
    line = refuses(["evaluate", "--dataset", str(work["dataset"]), "--out", str(tmp_path / "report"), "--segmenter", str(path)],
                   f"tact: error: {path}: not a TaskAdaptiveCT model file (PyTorch cannot read it as one: ",
                   [work["dataset"], tmp_path, path.parent])
    _assert_no_unsafe_advice(line)
    if kind == "pickled":
        assert "(PyTorch cannot read it as one: UnpicklingError)" in line


@pytest.mark.parametrize("kind", ["text", "pickled"])
def test_checkpoint_that_is_not_a_model_file(work, not_models, kind):
    path = not_models[kind]
    line = refuses(["reconstruct", "--dataset", str(work["dataset"]), "--checkpoint", str(path), "--device", "cpu"],
                   f"tact: error: {path}: not a TaskAdaptiveCT model file", [work["dataset"], path.parent])
    _assert_no_unsafe_advice(line)


def test_resume_state_that_is_not_one(work, not_models, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(not_models["pickled"], run / "last.pt")
    line = refuses(["train", "segmentation", "--dataset", str(work["dataset"]), "--out", str(run), "--device", "cpu",
                    "epochs=1"],
                   f"tact: error: {run / 'last.pt'}: not a TaskAdaptiveCT resume state (PyTorch cannot read it as one: "
                   "UnpicklingError)", [work["dataset"], tmp_path])
    _assert_no_unsafe_advice(line)


# 7. Volumes that are not a CT of a body ---------------------------------------------------


@pytest.fixture(scope="module")
def not_a_body(work) -> dict[str, Path]:
    """One-case LiTS folders: a volume of air only under a liver mask, and labels placed in the air."""
    volume = nib.load(str(work["lits"] / "volume-0.nii.gz"))
    labels = nib.load(str(work["lits"] / "segmentation-0.nii.gz"))
    hu = np.asarray(volume.dataobj, dtype=np.float32)
    seg = np.asarray(labels.dataobj, dtype=np.uint8)
    folders = {}
    air = np.full_like(hu, -1024.0)
    corner = np.zeros_like(seg)
    corner[:6, :6, :] = 1  # the corner of the field of view, outside the body
    for name, (hu_data, seg_data) in {"no-tissue": (air, seg), "labels-on-air": (hu, corner)}.items():
        folder = work["root"] / name
        folder.mkdir()
        nib.save(nib.Nifti1Image(hu_data, volume.affine), str(folder / "volume-0.nii.gz"))
        nib.save(nib.Nifti1Image(seg_data, labels.affine), str(folder / "segmentation-0.nii.gz"))
        folders[name] = folder
    return folders


def test_volume_without_tissue_is_not_a_ct_of_a_body(work, not_a_body, tmp_path):
    lits = not_a_body["no-tissue"]
    refuses(["simulate", "--lits", str(lits), "--out", str(tmp_path / "new" / "dataset"), *SIM_ARGS],
            f"tact: error: {lits / 'volume-0.nii.gz'}: not a CT of a body: no tissue", [lits, tmp_path])


def test_labels_on_air_are_refused_naming_the_segmentation(work, not_a_body, tmp_path):
    lits = not_a_body["labels-on-air"]
    out = tmp_path / "dataset"
    out.mkdir()  # an existing, empty output folder stays empty
    refuses(["simulate", "--lits", str(lits), "--out", str(out), *SIM_ARGS],
            f"tact: error: {lits / 'segmentation-0.nii.gz'}: the labels lie on air", [lits, tmp_path])


# 8. Smaller ones --------------------------------------------------------------------------


def test_lits_that_is_a_file(work, tmp_path):
    refuses(["simulate", "--lits", str(work["file"]), "--out", str(tmp_path / "out"), *SIM_ARGS],
            f"tact: error: {work['file']}: is a file, not a folder", [tmp_path, work["root"]])


@pytest.mark.parametrize("args", [
    ["simulate", "--lits", "LITS", "--out", "OUT", "-q"],
    ["simulate", "-q", "--lits", "LITS", "--out", "OUT"],
    ["-q", "simulate", "--lits", "LITS", "--out", "OUT", "--quiet"],
])
def test_quiet_is_accepted_before_and_after_the_sub_command(work, tmp_path, args):
    args = [{"LITS": str(work["file"]), "OUT": str(tmp_path / "out")}.get(a, a) for a in args]
    refuses(args, f"tact: error: {work['file']}: is a file, not a folder", [tmp_path], quiet=False)


def test_quiet_is_accepted_at_every_level(work):
    for args in (["baseline", "-q", "fbp", "--dataset", str(work["dataset"]), "--frequency-scaling", "0"],
                 ["baseline", "fbp", "--dataset", str(work["dataset"]), "--frequency-scaling", "0", "-q"]):
        refuses(args, "tact: error: --frequency-scaling: must be in (0, 1], got 0", [work["dataset"]], quiet=False)


def _fake_method(dataset: Path, method: str, record: dict) -> None:
    """Give the data set a method by copying the FBP volumes under its name (its values do not matter here)."""
    manifest = json.loads((dataset / "dataset.json").read_text())
    for case in manifest["cases"]:
        target = volume_path(dataset, method, case)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(volume_path(dataset, "fbp", case), target)
    manifest["methods"][method] = record
    (dataset / "dataset.json").write_text(json.dumps(manifest, indent=2))


def test_evaluate_without_methods_uses_what_the_data_set_has(work, tmp_path):
    report = tmp_path / "report"
    # -q after the sub-command silences the progress bars.
    result = tact("evaluate", "--dataset", str(work["dataset"]), "--out", str(report), "--figures", "0", "-q", quiet=False)
    assert result.returncode == 0, result.stderr
    assert "slice/s" not in result.stderr and "%|" not in result.stderr, result.stderr
    rows = read_metrics_csv(report / "metrics.csv")
    assert list(dict.fromkeys(r.method for r in rows)) == ["lowdose", "fbp", "fulldose"]
    assert "BM3D" not in (report / "table_reconstruction.md").read_text()

    # Trained reconstructors come after the baselines, a method whose volumes are missing is left out.
    dataset = tmp_path / "dataset"
    shutil.copytree(work["dataset"], dataset)
    _fake_method(dataset, "baseunet", {"task": "reconstruction"})
    _fake_method(dataset, "bm3d", {"sigma_psd": 0.075})
    manifest = json.loads((dataset / "dataset.json").read_text())
    manifest["methods"]["ta0.5"] = {"task": "reconstruction"}  # recorded, but no volumes
    (dataset / "dataset.json").write_text(json.dumps(manifest))
    assert SimulatedDataset(dataset).available_methods() == ["lowdose", "fbp", "bm3d", "baseunet", "fulldose"]
    result = tact("evaluate", "--dataset", str(dataset), "--out", str(tmp_path / "report2"), "--figures", "0")
    assert result.returncode == 0, result.stderr
    rows = read_metrics_csv(tmp_path / "report2" / "metrics.csv")
    assert list(dict.fromkeys(r.method for r in rows)) == ["lowdose", "fbp", "bm3d", "baseunet", "fulldose"]


# 9. argparse's own errors -----------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["evaluate", "--dataset", "D", "--out", "R", "--split", "bad"],
     "tact: error: --split: invalid choice: 'bad' (choose from 'test', 'train', 'all'); see `tact evaluate --help`"),
    (["simulate", "--out", "OUT"], "tact: error: --lits: required, but not given; see `tact simulate --help`"),
    (["phantom", "--out", "OUT", "--volumes", "two"],
     "tact: error: --volumes: must be a positive integer, got two; see `tact phantom --help`"),
    (["simulate", "--lits", "L", "--out", "OUT", "--angles", "0"],
     "tact: error: --angles: must be a positive integer, got 0; see `tact simulate --help`"),
    (["baseline", "fbp", "--dataset", "D", "--bogus", "1"],
     "tact: error: --bogus 1: unrecognized argument(s); see `tact baseline fbp --help`"),
    (["frobnicate"], "tact: error: COMMAND: invalid choice: 'frobnicate'"),
    ([], "tact: error: COMMAND: required, but not given; see `tact --help`"),
    (["train", "joint", "--dataset", "D", "--out", "R", "--device", "tpu"],
     "tact: error: --device: invalid choice: 'tpu' (choose from 'cpu', 'cuda'); see `tact train joint --help`"),
])
def test_argparse_errors_are_one_line_naming_the_option(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)  # relative names: nothing may appear here
    refuses(args, expected, [tmp_path])
