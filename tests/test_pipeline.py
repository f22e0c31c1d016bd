"""End to end through the `tact` command: phantom -> simulate -> baselines -> evaluate.

Small sizes (64 px slices, 64 angles) keep it to seconds; every stage runs for real
(ODL/astra projections, BM3D, process pools, files on disk).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from training.dataset import SimulatedDataset, volume_path
from training.evaluate import read_metrics_csv
from training.simulate import SimulationSettings, simulate_dataset

TACT = Path(sys.executable).with_name("tact")
SIZE, ANGLES = 64, 64
# Few photons, so that at 64 px (5 mm pixels) noise dominates as it does at 512 px.
SIM_ARGS = ["--size", str(SIZE), "--angles", str(ANGLES), "--seed", "3", "--photons", "300"]


def tact(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(TACT), "-q", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"tact {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """One full pipeline run shared by the tests of this module."""
    root = tmp_path_factory.mktemp("pipeline")
    paths = {"lits": root / "lits", "dataset": root / "dataset", "report": root / "report"}
    tact("phantom", "--out", str(paths["lits"]), "--volumes", "3", "--size", str(SIZE), "--slices", "8", "--seed", "5")
    tact("simulate", "--lits", str(paths["lits"]), "--out", str(paths["dataset"]), "--workers", "2", *SIM_ARGS)
    tact("baseline", "fbp", "--dataset", str(paths["dataset"]), "--tune-slices", "4")
    tact("baseline", "bm3d", "--dataset", str(paths["dataset"]), "--sweep", "--sweep-slices", "2")
    paths["evaluate_stdout"] = tact("evaluate", "--dataset", str(paths["dataset"]), "--out", str(paths["report"])).stdout
    return paths


def test_tact_is_installed_beside_the_interpreter(tmp_path):
    assert TACT.is_file() and os.access(TACT, os.X_OK)
    # From any folder, `training` must be this project's package, not another distribution's
    # top-level `training` (sam2 ships one).
    where = subprocess.run([sys.executable, "-c", "import training; print(training.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where) == Path(__file__).parents[1] / "training" / "__init__.py"


def test_dataset_layout_split_and_slices(run):
    dataset = SimulatedDataset(run["dataset"])
    split = dataset.manifest["split"]
    assert split["by"] == "patient"
    assert not set(split["train"]) & set(split["test"])
    assert sorted(split["train"] + split["test"]) == ["0", "1", "2"]
    assert len(split["test"]) == 1
    for case, record in dataset.cases.items():
        segmentation = nib.load(str(run["lits"] / f"segmentation-{case}.nii.gz")).get_fdata()
        non_empty = [k for k in range(segmentation.shape[2]) if segmentation[:, :, k].any()]
        assert record["source_slices"] == non_empty, "only slices with a segmentation are kept"
        for method in ("lowdose", "fulldose", "final", "fbp", "bm3d"):
            image = nib.load(str(volume_path(run["dataset"], method, case)))
            assert image.shape == (SIZE, SIZE, len(non_empty))
            assert isinstance(image.dataobj, nib.arrayproxy.ArrayProxy) and image.dataobj.is_proxy
        assert dataset.sinogram(case).shape[:2] == (len(non_empty), ANGLES)
        assert dataset.slice_hu("final", dataset.slices()[0]).dtype == np.uint8
    assert not list(run["dataset"].rglob(".*tmp*")), "no temporary files left behind"
    assert not (run["dataset"] / ".partial").exists()


def test_fulldose_matches_the_source_volume(run):
    dataset = SimulatedDataset(run["dataset"])
    case = dataset.case_ids()[0]
    source = nib.load(str(run["lits"] / f"volume-{case}.nii.gz"))
    kept = dataset.cases[case]["source_slices"]
    expected = np.clip(source.get_fdata()[:, :, kept], -1001, 3071)
    fulldose = dataset.volume("fulldose", case)
    np.testing.assert_allclose(fulldose.get_fdata(), expected, atol=0.5)
    np.testing.assert_allclose(fulldose.header.get_zooms(), source.header.get_zooms(), rtol=1e-5)


def test_baseline_parameters_were_chosen_on_training_slices(run, tmp_path):
    methods = SimulatedDataset(run["dataset"]).methods
    assert methods["fbp"]["tuned_on"] == "4 training slices"
    for method, parameter in (("fbp", "frequency_scaling"), ("bm3d", "sigma_psd")):
        sweep = {float(k): v for k, v in methods[method]["sweep"].items()}
        assert len(sweep) > 3
        assert methods[method][parameter] == max(sweep, key=sweep.get)
    # Corrupting every test slice's data (the FBP's sinograms, BM3D's low-dose input)
    # changes neither the tuned values nor any number of their sweeps.
    from training.baselines import sweep_bm3d_sigma, tune_fbp_scaling

    corrupted = tmp_path / "corrupted"
    shutil.copytree(run["dataset"], corrupted)
    dataset = SimulatedDataset(corrupted)
    rng = np.random.default_rng(0)
    for case in dataset.case_ids("test"):
        sinogram = np.load(corrupted / "sinograms" / f"{case}.npy")
        np.save(corrupted / "sinograms" / f"{case}.npy", sinogram + rng.normal(0, 0.5, sinogram.shape).astype(np.float32))
        lowdose = nib.load(str(volume_path(corrupted, "lowdose", case)))
        noisy = np.asarray(lowdose.dataobj) + rng.normal(0, 2000, lowdose.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(noisy, lowdose.affine), str(volume_path(corrupted, "lowdose", case)))
    dataset = SimulatedDataset(corrupted)
    scaling, fbp_sweep = tune_fbp_scaling(dataset, max_slices=4, workers=2, progress=False)
    sigma, bm3d_sweep = sweep_bm3d_sigma(dataset, max_slices=2, workers=2, progress=False)
    assert scaling == methods["fbp"]["frequency_scaling"] and sigma == methods["bm3d"]["sigma_psd"]
    assert fbp_sweep == {float(k): v for k, v in methods["fbp"]["sweep"].items()}
    # BM3D itself varies between runs in the last digits (up to about 1e-4 dB seen for the
    # same input); the corruption would move these PSNRs by decibels.
    assert bm3d_sweep == pytest.approx({float(k): v for k, v in methods["bm3d"]["sweep"].items()}, abs=1e-3)
    # the corruption is not a no-op: the test slices' FBP changes
    ref = dataset.slices("test")[0]
    from training.baselines import fbp_slice

    assert not np.allclose(fbp_slice(dataset, ref, scaling), fbp_slice(SimulatedDataset(run["dataset"]), ref, scaling))


def test_report_rows_tables_and_figures(run):
    dataset = SimulatedDataset(run["dataset"])
    rows = read_metrics_csv(run["report"] / "metrics.csv")
    test_slices = dataset.slices("test")
    assert len(rows) == 4 * len(test_slices)
    assert {r.method for r in rows} == {"lowdose", "fbp", "bm3d", "fulldose"}
    assert {r.case for r in rows} == set(dataset.case_ids("test"))
    mean = {m: np.mean([r.psnr for r in rows if r.method == m]) for m in ("lowdose", "fbp", "bm3d")}
    assert mean["fbp"] > mean["lowdose"] + 4, mean
    assert mean["bm3d"] > mean["lowdose"] + 4, mean
    assert all(r.psnr == np.inf and r.ssim == pytest.approx(1.0) for r in rows if r.method == "fulldose")
    table = (run["report"] / "table_reconstruction.md").read_text()
    for label in ("| Low-dose |", "| FBP |", "| BM3D |", "| Full-dose | reference"):
        assert label in table
    assert f"{mean['fbp']:.2f} ±" in table
    assert table in run["evaluate_stdout"]
    figures = sorted((run["report"] / "figures").glob("*.png"))
    assert len(figures) == 3  # two example slices and the box plots
    for figure in figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000


def test_simulation_does_not_depend_on_worker_count(run, tmp_path):
    settings = SimulationSettings(num_angles=ANGLES, size=SIZE, seed=3, photons=300)
    serial = simulate_dataset(run["lits"], tmp_path / "serial", settings, workers=1, progress=False)
    parallel = SimulatedDataset(run["dataset"])
    for case in parallel.case_ids():
        np.testing.assert_array_equal(serial.volume("lowdose", case).get_fdata(), parallel.volume("lowdose", case).get_fdata())
        np.testing.assert_array_equal(serial.sinogram(case), parallel.sinogram(case))
    other_seed = simulate_dataset(run["lits"], tmp_path / "seed4", SimulationSettings(num_angles=ANGLES, size=SIZE, seed=4, photons=300),
                                  workers=2, progress=False)
    case = parallel.case_ids()[0]
    assert not np.array_equal(other_seed.sinogram(case), parallel.sinogram(case))


def test_killed_simulation_resumes_to_the_same_result(tmp_path):
    lits = tmp_path / "lits"
    tact("phantom", "--out", str(lits), "--volumes", "2", "--size", "128", "--slices", "12", "--seed", "1")
    args = ["--size", "128", "--angles", "300", "--workers", "2"]
    out = tmp_path / "interrupted"
    process = subprocess.Popen([str(TACT), "-q", "simulate", "--lits", str(lits), "--out", str(out), *args],
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((out / ".partial").rglob("*.npz")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    manifest = json.loads((out / "dataset.json").read_text())
    assert not all(c.get("complete") for c in manifest["cases"].values()) or len(manifest["cases"]) < 2
    for nifti in out.rglob("*.nii"):  # whatever exists under a final name is whole
        nib.load(str(nifti)).get_fdata()
    with pytest.raises(Exception, match="incomplete|no cases"):
        SimulatedDataset(out)

    tact("simulate", "--lits", str(lits), "--out", str(out), *args)
    tact("simulate", "--lits", str(lits), "--out", str(tmp_path / "reference"), *args)
    resumed, reference = SimulatedDataset(out), SimulatedDataset(tmp_path / "reference")
    assert resumed.manifest["cases"].keys() == reference.manifest["cases"].keys()
    for case in reference.case_ids():
        np.testing.assert_array_equal(resumed.volume("lowdose", case).get_fdata(), reference.volume("lowdose", case).get_fdata())
    assert not list(out.rglob(".*tmp*"))


def test_bad_input_fails_cleanly(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = tact("simulate", "--lits", str(empty), "--out", str(tmp_path / "d"), *SIM_ARGS, check=False)
    assert result.returncode == 2 and str(empty) in result.stderr and "tact: error:" in result.stderr
    assert not (tmp_path / "d").exists(), "nothing written for bad input"

    result = tact("simulate", "--lits", str(run["lits"]), "--out", str(run["dataset"]), "--size", "32", "--angles", "64",
                  check=False)
    assert result.returncode == 2 and "other settings" in result.stderr

    result = tact("simulate", "--lits", str(run["lits"]), "--out", str(tmp_path / "d"), "--photons", "-5", check=False)
    assert result.returncode == 2 and "--photons: must be a positive finite number, got -5" in result.stderr

    result = tact("evaluate", "--dataset", str(tmp_path), "--out", str(tmp_path / "r"), check=False)
    assert result.returncode == 2 and "dataset.json" in result.stderr

    # A baseline whose run did not finish (no manifest record) is not evaluated.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run["dataset"], unfinished)
    manifest = json.loads((unfinished / "dataset.json").read_text())
    del manifest["methods"]["bm3d"]
    (unfinished / "dataset.json").write_text(json.dumps(manifest))
    result = tact("evaluate", "--dataset", str(unfinished), "--methods", "lowdose,bm3d", "--out", str(tmp_path / "r"),
                  check=False)
    assert result.returncode == 2 and "['bm3d'] not computed" in result.stderr and "tact baseline bm3d" in result.stderr

    result = tact("evaluate", "--dataset", str(run["dataset"]), "--methods", "lowdose,magic", "--out", str(tmp_path / "r"),
                  check=False)
    assert result.returncode == 2 and "magic" in result.stderr
    assert not (tmp_path / "r").exists()


def _tree(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_the_upsampling_setting_is_honoured(run, tmp_path):
    """Each slice's data are the seeded Poisson draw from the image projected at the
    data set's upsampling: 2 (the default, the data set of this module) or 1."""
    from training.loaders import load_lits_case
    from training.physics import CTSimulator, ScanGeometry
    from training.simulate import _slice_seed, prepare_case

    lits = tmp_path / "lits"
    lits.mkdir()
    for name in ("volume-0.nii.gz", "segmentation-0.nii.gz"):
        shutil.copy(run["lits"] / name, lits / name)
    once = SimulationSettings(num_angles=ANGLES, size=SIZE, seed=3, photons=300, test_fraction=0.0, upsample=1)
    data = {1: simulate_dataset(lits, tmp_path / "once", once, workers=1, progress=False), 2: SimulatedDataset(run["dataset"])}
    assert data[1].settings["upsample"] == 1 and data[2].settings["upsample"] == 2
    prepared = prepare_case(load_lits_case(lits / "volume-0.nii.gz", lits / "segmentation-0.nii.gz", "0"), once)
    geometry = ScanGeometry(SIZE, prepared.extent_m, ANGLES)
    for z in (0, len(prepared.source_slices) - 1):
        seed = np.random.SeedSequence(_slice_seed(3, "0", prepared.source_slices[z]))
        expected = {u: CTSimulator(geometry, upsample=u).noisy_data(prepared.x_full[:, :, z], 300, np.random.default_rng(seed))
                    for u in (1, 2)}
        assert not np.array_equal(expected[1], expected[2])
        for upsample, dataset in data.items():
            np.testing.assert_array_equal(dataset.sinogram("0")[z], expected[upsample])


def test_resuming_with_another_projector_is_refused(run):
    dataset = run["dataset"]
    assert SimulatedDataset(dataset).settings["projector"] == "astra_cpu"
    before = _tree(dataset)
    result = tact("simulate", "--lits", str(run["lits"]), "--out", str(dataset), "--impl", "astra_cuda", "--workers", "2",
                  *SIM_ARGS, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"tact: error: {dataset / 'dataset.json'}: this data set was simulated with the "
                                    "astra_cpu projector, and this run would use astra_cuda")
    assert "Traceback" not in result.stderr
    assert _tree(dataset) == before


def test_a_bad_case_among_good_ones_is_refused_before_anything_is_written(run, tmp_path):
    lits = tmp_path / "lits"
    shutil.copytree(run["lits"], lits)
    bad = lits / "segmentation-2.nii.gz"
    image = nib.load(str(bad))
    labels = np.asarray(image.dataobj).copy()
    labels[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(labels, image.affine), str(bad))
    out = tmp_path / "dataset"
    result = tact("simulate", "--lits", str(lits), "--out", str(out), "--workers", "2", *SIM_ARGS, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"tact: error: {bad}: segmentation has labels outside {{0, 1, 2}}: 7")
    assert not out.exists(), "nothing is written when one input case is refused"
    shutil.copy(run["lits"] / bad.name, bad)  # the corrected input, into the same --out
    tact("simulate", "--lits", str(lits), "--out", str(out), "--workers", "2", *SIM_ARGS)
    assert SimulatedDataset(out).case_ids() == ["0", "1", "2"]
