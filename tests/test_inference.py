"""Trained networks applied to a data set: `reconstruct_dataset`, and Dice in `evaluate_dataset`.

A real data set (phantoms simulated with ODL/astra at 64 px, 64 angles, as in
test_pipeline), real model files written by `checkpoints.save_model`, and a small
segmentation U-Net trained here for a few seconds on the full-dose training slices (test
scaffolding, not the project's training engine), so that its Dice scores mean something.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.image import imread
from monai.losses import DiceCELoss
from monai.metrics import compute_dice

from training import inference
from training.checkpoints import load_segmenter, read_model, save_model
from training.dataset import SimulatedDataset, volume_path
from training.errors import DataError
from training.evaluate import evaluate_dataset, pick_figure_slices, read_metrics_csv
from training.inference import reconstruct_dataset, reconstruct_images, segment_images
from training.methods import is_known_method, method_label, method_name, without_variant
from training.metrics import dice_per_class
from training.networks import UNetConfig, build_reconstruction_net, build_segmentation_net
from training.phantom import write_phantom_dataset
from training.physics import normalized_to_hu
from training.simulate import SimulationSettings, simulate_dataset
from training.volume import LABEL_LIVER, LABEL_TUMOR

SIZE, ANGLES = 64, 64
TINY = UNetConfig(features=4, depth=2)
SEGMENTER_NET = UNetConfig(features=8, depth=2)
ALPHA = 0.5
METHOD = method_name("reconstruction", ALPHA)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks run fastest on one thread; on a busy 2-core machine two threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three phantom patients (two train, one test), as test_pipeline simulates them."""
    root = tmp_path_factory.mktemp("inference")
    write_phantom_dataset(root / "lits", 3, size=SIZE, slices=8, seed=5, progress=False)
    settings = SimulationSettings(num_angles=ANGLES, size=SIZE, seed=3, photons=300)
    simulate_dataset(root / "lits", root / "dataset", settings, workers=2, progress=False)
    return root / "dataset"


@pytest.fixture(scope="module")
def reconstructor(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A task-adaptive (alpha 0.5) model file around a seeded, untrained f, and f itself."""
    torch.manual_seed(1)
    net = build_reconstruction_net(TINY).eval()
    path = tmp_path_factory.mktemp("models") / "f.pt"
    save_model(path, "reconstruction", ALPHA, TINY, {"reconstructor": net}, epoch=3, metrics={"psnr": 20.0})
    return path, net


def _fulldose_training_set(dataset: SimulatedDataset) -> tuple[torch.Tensor, torch.Tensor]:
    refs = dataset.slices("train")
    images = torch.from_numpy(np.stack([dataset.slice("fulldose", r) for r in refs]))[:, None]
    labels = torch.from_numpy(np.stack([dataset.segmentation(r) for r in refs]).astype(np.int64))[:, None]
    return images, labels


def _mean_dice(net: torch.nn.Module, dataset: SimulatedDataset, method: str, split: str) -> float:
    refs = dataset.slices(split)
    maps = segment_images(net, np.stack([dataset.slice(method, r) for r in refs]))
    return float(np.mean([np.mean(list(dice_per_class(m, dataset.segmentation(r)).values())) for m, r in zip(maps, refs)]))


@pytest.fixture(scope="module")
def segmenter(data, tmp_path_factory) -> Path:
    """g trained on the full-dose training slices until it segments them (Dice >= 0.75), saved as a model file."""
    dataset = SimulatedDataset(data)
    images, labels = _fulldose_training_set(dataset)
    torch.manual_seed(0)
    net = build_segmentation_net(SEGMENTER_NET)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    score = 0.0
    for iteration in range(1, 301):
        net.train()
        optimizer.zero_grad()
        loss(net(images), labels).backward()
        optimizer.step()
        if iteration % 20 == 0:
            score = _mean_dice(net, dataset, "fulldose", "train")
            if score >= 0.75:
                break
    assert score >= 0.75, f"the scaffolding segmenter did not learn (training Dice {score:.3f})"
    path = tmp_path_factory.mktemp("models") / "g.pt"
    save_model(path, "segmentation", 0.0, SEGMENTER_NET, {"segmenter": net}, epoch=iteration,
               metrics={"dice_score": score, "loss": 0.25})
    return path


# --------------------------------------------------------------------------- method names


@pytest.mark.parametrize(("name", "label"), [
    ("lowdose", "Low-dose"), ("fbp", "FBP"), ("bm3d", "BM3D"), ("fulldose", "Full-dose"),
    ("baseunet", "Base U-Net"), ("ta0.1", "Task-adaptive α=0.1"), ("ta0.5", "Task-adaptive α=0.5"),
    ("ta1", "Task-adaptive α=1"), ("joint0.9", "Joint training C=0.9"), ("joint0", "Joint training C=0"),
    ("ta0.5-balanced", "Task-adaptive α=0.5, balanced"), ("baseunet-interp", "Base U-Net, interp"),
    ("joint0.1-g2", "Joint training C=0.1, g2"),
])
def test_method_labels_of_the_paper(name, label):
    assert is_known_method(name)
    assert method_label(name) == label


@pytest.mark.parametrize("name", ["magic", "final", "ta0", "ta0.50", "ta1.5", "joint-0.1", "tanan", "joint", "ta", "",
                                  "ta0.5-", "ta0.5-Balanced", "ta0.5-2x", "ta0-balanced", "-balanced", "fbp-x",
                                  "ta0.50-balanced", "ta0.5-a-b"])
def test_unknown_method_names_are_refused(name):
    assert not is_known_method(name)
    with pytest.raises(ValueError, match="unknown method"):
        method_label(name)


def test_method_names_of_trained_models_are_known():
    for task, weight in [("reconstruction", 0.0), ("reconstruction", 0.1), ("reconstruction", 0.9), ("joint", 0.5)]:
        assert is_known_method(method_name(task, weight))
        assert is_known_method(method_name(task, weight, "balanced"))
        assert without_variant(method_name(task, weight, "balanced")) == method_name(task, weight)
    assert method_name("reconstruction", 0.5, "interp") == "ta0.5-interp"
    for bad in ("", "Interp", "2x", "a-b"):
        with pytest.raises(ValueError, match="variant tag"):
            method_name("reconstruction", 0.5, bad)


# ------------------------------------------------------------------ batched forward passes


def test_segment_images_is_argmax_of_g_in_eval_mode_whatever_the_batch(data):
    dataset = SimulatedDataset(data)
    refs = dataset.slices("all")[:7]
    images = np.stack([dataset.slice("lowdose", r) for r in refs])
    torch.manual_seed(2)
    g = build_segmentation_net(TINY)
    for p in g.modules():  # give batch norm running statistics that differ from a batch's
        if isinstance(p, torch.nn.BatchNorm2d):
            p.running_mean.uniform_(-0.2, 0.2)
            p.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        expected = g.eval()(torch.from_numpy(images[:, None])).argmax(1).numpy()
        # a copy: a forward pass in train mode updates the running statistics
        in_train_mode = copy.deepcopy(g).train()(torch.from_numpy(images[:, None])).argmax(1).numpy()
    g.train()
    assert not np.array_equal(expected, in_train_mode), "the check needs eval and train mode to differ"
    for batch_size in (1, 3, 16):
        maps = segment_images(g, images, batch_size=batch_size, device="cpu")
        assert maps.dtype == np.uint8 and maps.shape == images.shape
        np.testing.assert_array_equal(maps, expected)
    assert g.training, "the caller's mode is restored"


def test_reconstruct_images_matches_a_direct_forward_pass(data, reconstructor):
    _, f = reconstructor
    dataset = SimulatedDataset(data)
    images = np.stack([dataset.slice("lowdose", r) for r in dataset.slices("all")[:5]])
    with torch.no_grad():
        expected = f(torch.from_numpy(images[:, None]))[:, 0].numpy()
    out = reconstruct_images(f, images.astype(np.float64), batch_size=2)
    assert out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert np.all((out > 0) & (out < 1))


def test_bad_images_are_refused(reconstructor):
    _, f = reconstructor
    good = np.full((2, SIZE, SIZE), 0.3, dtype=np.float32)
    bad = good.copy()
    bad[1, 5, 5] = np.nan
    with pytest.raises(ValueError, match=r"images \[1\] .*NaN"):
        segment_images(build_segmentation_net(TINY), bad)
    with pytest.raises(ValueError, match="NaN or infinite"):
        reconstruct_images(f, np.where(good > 0, np.inf, good))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        reconstruct_images(f, good[0])
    with pytest.raises(ValueError, match="dtype"):
        reconstruct_images(f, (good * 100).astype(np.int16))
    with pytest.raises(ValueError, match="multiples of it, got 62 x 62"):
        reconstruct_images(f, good[:, :62, :62])
    with pytest.raises(ValueError, match="batch_size"):
        reconstruct_images(f, good, batch_size=0)


# ------------------------------------------------------------------- reconstruct_dataset


def test_reconstruct_dataset_writes_f_of_every_lowdose_slice(data, reconstructor):
    path, f = reconstructor
    dataset = SimulatedDataset(data)
    assert reconstruct_dataset(dataset, path, batch_size=5, device="cpu", progress=False) == METHOD == "ta0.5"
    reopened = SimulatedDataset(data)
    assert reopened.has_method(METHOD)
    record = reopened.methods[METHOD]
    assert record["checkpoint"] == str(path.resolve()) and record["task"] == "reconstruction"
    assert record["weight"] == ALPHA and record["epoch"] == 3 and record["network"]["features"] == TINY.features
    for case in dataset.case_ids():
        lowdose = dataset.volume("lowdose", case)
        written = nib.load(str(volume_path(data, METHOD, case)))
        assert written.shape == lowdose.shape and written.get_data_dtype() == np.float32
        np.testing.assert_array_equal(written.affine, lowdose.affine)
        refs = [r for r in dataset.slices() if r.case == case]
        with torch.no_grad():  # f on the low-dose slices, in slice order, converted to HU
            x = torch.from_numpy(np.stack([dataset.slice("lowdose", r) for r in refs]))[:, None]
            expected = normalized_to_hu(f(x)[:, 0].numpy()).transpose(1, 2, 0)
        np.testing.assert_allclose(written.get_fdata(), expected, rtol=0, atol=0.05)
        assert np.ptp(expected) > 100, "a constant output would not test the slice order"
        # the HU round trip of the data set gives back f's normalised output
        for ref in refs[:2]:
            np.testing.assert_allclose(reopened.slice(METHOD, ref), reconstruct_images(f, dataset.slice("lowdose", ref)[None])[0],
                                       rtol=0, atol=1e-6)


def test_an_interrupted_reconstruction_is_not_counted(data, reconstructor, monkeypatch):
    path, _ = reconstructor
    dataset = SimulatedDataset(data)
    reconstruct_dataset(dataset, path, method="ta0.9", device="cpu", progress=False)
    assert SimulatedDataset(data).has_method("ta0.9")
    written = []
    real_save = inference.save_nifti

    def save_then_die(*args, **kwargs):
        if written:
            raise KeyboardInterrupt  # killed while writing the second case
        written.append(args[0])
        real_save(*args, **kwargs)

    monkeypatch.setattr(inference, "save_nifti", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_dataset(SimulatedDataset(data), path, method="ta0.9", device="cpu", progress=False)
    assert len(written) == 1
    on_disk = SimulatedDataset(data)
    assert all(volume_path(data, "ta0.9", c).is_file() for c in on_disk.case_ids()), "volumes of the earlier run remain"
    assert "ta0.9" not in on_disk.methods and not on_disk.has_method("ta0.9")
    with pytest.raises(DataError, match=r"\['ta0.9'\] not computed.*tact reconstruct"):
        evaluate_dataset(on_disk, ["lowdose", "ta0.9", "fulldose"], data.parent / "never", progress=False)
    monkeypatch.undo()
    reconstruct_dataset(on_disk, path, method="ta0.9", device="cpu", progress=False)
    assert SimulatedDataset(data).has_method("ta0.9")


def test_reconstruct_dataset_refuses_bad_models_and_names(data, reconstructor, segmenter, tmp_path):
    path, f = reconstructor
    dataset = SimulatedDataset(data)
    before = (data / "dataset.json").read_text()
    for taken in ("lowdose", "fulldose", "final", "fbp", "bm3d"):
        with pytest.raises(ValueError, match=f"{taken!r} is taken"):
            reconstruct_dataset(dataset, path, method=taken, progress=False)
    with pytest.raises(ValueError, match="'magic' is not one the evaluation can label"):
        reconstruct_dataset(dataset, path, method="magic", progress=False)
    with pytest.raises(DataError, match="without a reconstruction network"):
        reconstruct_dataset(dataset, segmenter, progress=False)
    deep = tmp_path / "deep.pt"
    config = UNetConfig(features=1, depth=7)
    save_model(deep, "reconstruction", 0.0, config, {"reconstructor": build_reconstruction_net(config)}, epoch=1, metrics={})
    with pytest.raises(DataError, match="multiples of 128, but the data set's slices are 64 x 64 px") as error:
        reconstruct_dataset(dataset, deep, progress=False)
    assert error.value.path == deep
    with pytest.raises(DataError, match="no such model file"):
        reconstruct_dataset(dataset, tmp_path / "missing.pt", progress=False)
    assert (data / "dataset.json").read_text() == before, "a refused run leaves the manifest alone"
    assert not (data / "lowdose" / "labels" / "baseunet").exists()


def test_model_files_of_version_1_still_load_and_unknown_versions_are_refused(reconstructor, tmp_path):
    path, f = reconstructor
    payload = torch.load(path, weights_only=True)
    assert payload["version"] == 2 and "imaging" in payload
    old = {k: v for k, v in payload.items() if k != "imaging"} | {"version": 1}
    torch.save(old, tmp_path / "v1.pt")
    model = read_model(tmp_path / "v1.pt")
    assert model.version == 1 and model.imaging is None
    g_or_f, _ = inference.load_reconstructor(tmp_path / "v1.pt")
    for key, value in f.state_dict().items():
        assert torch.equal(g_or_f.state_dict()[key], value)
    torch.save(payload | {"version": 3}, tmp_path / "v3.pt")
    with pytest.raises(DataError, match="version 3 is not supported .*reads versions 1, 2"):
        read_model(tmp_path / "v3.pt")


# --------------------------------------------------------------------------- Dice report


@pytest.fixture(scope="module")
def report(data, reconstructor, segmenter, tmp_path_factory) -> Path:
    dataset = SimulatedDataset(data)
    if not dataset.has_method(METHOD):
        reconstruct_dataset(dataset, reconstructor[0], device="cpu", progress=False)
    out = tmp_path_factory.mktemp("report")
    evaluate_dataset(SimulatedDataset(data), ["lowdose", "fbp", METHOD, "fulldose"], out, split="all", figures=1,
                     workers=2, progress=False, segmenter=segmenter, device="cpu")
    return out


def _expected_dice(predicted: np.ndarray, reference: np.ndarray) -> dict[str, list[float]]:
    """Liver and tumour Dice of one slice written out by hand: eq. 7 (absent from both = 1)
    and present classes only (absent from both = NaN)."""
    eq7, present = [], []
    for label in (LABEL_LIVER, LABEL_TUMOR):
        p, g = predicted == label, reference == label
        total = p.sum() + g.sum()
        eq7.append(1.0 if total == 0 else 2 * (p & g).sum() / total)
        present.append(math.nan if total == 0 else 2 * (p & g).sum() / total)
    return {"slice_eq7": eq7, "slice_present": present}


@pytest.fixture(scope="module")
def expected_dice(data, segmenter) -> dict[str, dict]:
    """Per method: g's maps of every slice and the Dice values computed independently of training.metrics."""
    dataset = SimulatedDataset(data)
    refs = dataset.slices("all")
    g = load_segmenter(segmenter)
    expected = {}
    for method in ("lowdose", "fbp", METHOD, "fulldose"):
        maps = segment_images(g, np.stack([dataset.slice(method, r) for r in refs]))
        references = np.stack([dataset.segmentation(r) for r in refs])
        per_slice = {(r.case, r.index): _expected_dice(m, ref) for r, m, ref in zip(refs, maps, references)}
        volumes = {}
        for case in dataset.case_ids("all"):
            mine = [i for i, r in enumerate(refs) if r.case == case]
            # MONAI on the stacked volume; a class absent from both is not counted
            prediction = torch.from_numpy(maps[mine].astype(np.int64))[None]
            reference = torch.from_numpy(references[mine].astype(np.int64))[None]
            onehot = [torch.nn.functional.one_hot(t, 3).movedim(-1, 1).float() for t in (prediction, reference)]
            scores = compute_dice(*onehot, include_background=False, ignore_empty=False)[0].tolist()
            absent = [not (maps[mine] == c).any() and not (references[mine] == c).any() for c in (LABEL_LIVER, LABEL_TUMOR)]
            volumes[case] = [math.nan if gone else score for score, gone in zip(scores, absent)]
        expected[method] = {"slices": per_slice, "volumes": volumes}
    return expected


def test_dice_columns_are_g_on_each_methods_image(data, report, expected_dice):
    rows = read_metrics_csv(report / "metrics.csv")
    assert len(rows) == 4 * len(SimulatedDataset(data).slices("all"))
    for method, expected in expected_dice.items():
        for row in (r for r in rows if r.method == method):
            for convention in ("slice_eq7", "slice_present"):
                liver, tumour = expected["slices"][row.case, row.slice][convention]
                values = [liver, tumour, np.nanmean([liver, tumour]) if not np.isnan([liver, tumour]).all() else math.nan]
                np.testing.assert_allclose(row.dice(convention), values, atol=1e-6)
    with open(report / "metrics.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header[:6] == ["method", "case", "slice", "psnr", "ssim", "rmse_hu"]
    assert header[6:] == ["dice_slice_eq7_liver", "dice_slice_eq7_tumour", "dice_slice_eq7",
                          "dice_slice_present_liver", "dice_slice_present_tumour", "dice_slice_present",
                          "liver_overlap", "liver_predicted", "liver_reference",
                          "tumour_overlap", "tumour_predicted", "tumour_reference"]
    with open(report / "dice_volume.csv", newline="") as handle:
        volumes = list(csv.DictReader(handle))
    assert len(volumes) == 4 * len(SimulatedDataset(data).case_ids("all"))
    for record in volumes:
        liver, tumour = expected_dice[record["method"]]["volumes"][record["case"]]
        for column, value in (("dice_volume_liver", liver), ("dice_volume_tumour", tumour)):
            assert record[column] == "" if math.isnan(value) else float(record[column]) == pytest.approx(value, abs=1e-5)
    # A segmenter trained on full-dose scans segments them better than the noisy low dose.
    mean = {m: np.mean([r.dice("slice_present")[2] for r in rows if r.method == m]) for m in ("lowdose", "fulldose")}
    assert mean["fulldose"] > mean["lowdose"] + 0.1, mean
    liver = {m: np.mean([r.dice("slice_eq7")[0] for r in rows if r.method == m]) for m in ("lowdose", "fulldose")}
    assert liver["fulldose"] > liver["lowdose"], liver


def _mean_std(values, total: int) -> str:
    values = np.asarray(values, dtype=float)
    counted = values[~np.isnan(values)]
    text = f"{counted.mean():.4f} ± {counted.std():.4f}"
    return text + (f" (n = {counted.size})" if counted.size < total else "")


def test_dice_table_in_the_form_of_table_ii(data, segmenter, report, expected_dice):
    table = (report / "table_dice.md").read_text()
    assert table.startswith("Table II")
    labels = {"lowdose": "Low-dose", "fbp": "FBP", METHOD: "Task-adaptive α=0.5", "fulldose": "Full-dose"}
    for method, expected in expected_dice.items():
        slices = list(expected["slices"].values())
        a = np.array([s["slice_eq7"] for s in slices])
        b = np.array([s["slice_present"] for s in slices])
        c = np.array(list(expected["volumes"].values()))
        with np.errstate(invalid="ignore"):
            b_mean = np.where(np.isnan(b).all(1), np.nan, np.nanmean(np.where(np.isnan(b), np.nan, b), axis=1))
        c_mean = np.nanmean(c, axis=1)
        n, patients = len(slices), len(c)
        line = (f"| {labels[method]} | {_mean_std(a.mean(1), n)} | {_mean_std(b_mean, n)} | {_mean_std(c_mean, patients)} "
                f"| {n} | {patients} |")
        assert line in table, (line, table)
        per_class = (f"| {labels[method]} | {_mean_std(a[:, 0], n)} | {_mean_std(a[:, 1], n)} | {_mean_std(b[:, 0], n)} "
                     f"| {_mean_std(b[:, 1], n)} | {_mean_std(c[:, 0], patients)} | {_mean_std(c[:, 1], patients)} |")
        assert per_class in table, (per_class, table)
    # An empty map scores 0 where only present classes count, but eq. 7 gives it 1 on every
    # class absent from the reference.
    dataset = SimulatedDataset(data)
    references = [dataset.segmentation(r) for r in dataset.slices("all")]
    empty_eq7 = [((0.0 if (ref == LABEL_LIVER).any() else 1.0) + (0.0 if (ref == LABEL_TUMOR).any() else 1.0)) / 2
                 for ref in references]
    assert np.mean(empty_eq7) > 0.2, "the test needs slices without tumour"
    zero = "0.0000 ± 0.0000"
    assert f"| Empty map (nothing found) | {_mean_std(empty_eq7, len(references))} | {zero} | {zero} |" in table
    model = read_model(segmenter)
    assert str(segmenter.resolve()) in table and f"epoch {model.epoch}" in table
    assert f"dice_score {model.metrics['dice_score']:.4g}" in table
    reconstruction = (report / "table_reconstruction.md").read_text()
    assert "| Task-adaptive α=0.5 |" in reconstruction and "| Full-dose | reference" in reconstruction


def test_segmentation_figures_for_the_example_slices(data, report):
    dataset = SimulatedDataset(data)
    [ref] = pick_figure_slices(dataset, dataset.slices("all"), 1)
    figures = {p.name for p in (report / "figures").glob("*.png")}
    stem = f"{ref.case}_{ref.index:03d}.png"
    assert figures == {f"reconstructions_{stem}", f"segmentations_{stem}", "metrics_boxplot.png"}
    for name in figures:
        assert (report / "figures" / name).stat().st_size > 10_000
    rgb = imread(report / "figures" / f"segmentations_{stem}")[..., :3]
    greenish = (rgb[..., 1] - rgb[..., 0] > 0.2) & (rgb[..., 1] - rgb[..., 2] > 0.2)
    assert greenish.sum() > 100, "the liver overlay is drawn in green"


def test_without_a_segmenter_the_report_is_unchanged(data, tmp_path):
    out = tmp_path / "report"
    rows = evaluate_dataset(SimulatedDataset(data), ["lowdose", "fbp", "fulldose"], out, figures=1, workers=1, progress=False)
    assert all(not r.has_dice and np.isnan(r.dice("slice_eq7")).all() for r in rows)
    with open(out / "metrics.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert records and all(r["dice_slice_eq7"] == r["dice_slice_present_liver"] == r["liver_overlap"] == "" for r in records)
    again = read_metrics_csv(out / "metrics.csv")
    assert [(r.method, r.case, r.slice) for r in again] == [(r.method, r.case, r.slice) for r in rows]
    assert all(not r.has_dice for r in again)
    assert not (out / "table_dice.md").exists() and not (out / "dice_volume.csv").exists()
    assert not list((out / "figures").glob("segmentations_*"))
    # a metrics.csv from before the Dice columns still reads
    legacy = tmp_path / "legacy.csv"
    legacy.write_text("method,case,slice,psnr,ssim,rmse_hu\nfbp,2,0,25.5,0.61,120\n")
    [row] = read_metrics_csv(legacy)
    assert row.psnr == 25.5 and not row.has_dice


def test_evaluate_refuses_a_reconstructor_as_segmenter_and_unknown_methods(data, reconstructor, tmp_path):
    dataset = SimulatedDataset(data)
    with pytest.raises(DataError, match="without a segmentation network") as error:
        evaluate_dataset(dataset, ["lowdose", "fulldose"], tmp_path / "r", segmenter=reconstructor[0], progress=False)
    assert error.value.path == reconstructor[0]
    deep = tmp_path / "deep.pt"
    config = UNetConfig(features=1, depth=7)
    save_model(deep, "segmentation", 0.0, config, {"segmenter": build_segmentation_net(config)}, epoch=1, metrics={})
    with pytest.raises(DataError, match="multiples of 128"):
        evaluate_dataset(dataset, ["lowdose", "fulldose"], tmp_path / "r", segmenter=deep, progress=False)
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['magic'\]"):
        evaluate_dataset(dataset, ["lowdose", "magic"], tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists(), "nothing written for refused input"
    assert json.loads((data / "dataset.json").read_text())["methods"].keys() >= {"fbp"}
