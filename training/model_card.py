"""Serving models from a ``tact reproduce`` run: the model folder, its model card, and the demo's check.

``tact export-models RUN --out apps/taskadaptive_ct/model`` copies chosen models of a run
(``RUN/models/<name>/best.pt``) into a model folder as ``<name>.pt``, writes
``serving.json`` (the default variant) and ``MODEL_CARD.md``: the data and imaging settings
each model was trained on, its validation metrics, its test metrics from the run's report,
limits, and :func:`served_quality` on the real sample, which the models never saw.

:func:`served_quality` applies the served pipeline (``training.inference``, as the app
runs it) to one patient's low-dose volume and compares it with the Hann FBP at the input's
resolution: PSNR inside the disc (as ``tact evaluate``), and g's liver Dice per volume on
the reconstruction and on the FBP.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.checkpoints import load_reconstructor, load_segmenter, read_model
from training.dataset import FULLDOSE, LOWDOSE, SimulatedDataset, SliceRef
from training.errors import DataError
from training.fileio import atomic_path, save_json
from training.inference import reconstruct_and_segment
from training.metrics import dice_counts, dice_from_counts, roi_psnr_ssim
from training.methods import PSNR_TOLERANCE_DB, method_label, method_name
from training.physics import MU_MAX, hu_to_mu
from training.volume import LABEL_LIVER

SERVING_FILE = "serving.json"
CARD_FILE = "MODEL_CARD.md"


@dataclass(frozen=True)
class ServedQuality:
    """The served pipeline against the Hann FBP on one patient (see the module docstring)."""

    case: str
    variant: str
    slices: int
    psnr_served: float
    psnr_fbp: float
    liver_dice_served: float
    liver_dice_fbp: float


def _normalised(hu: np.ndarray) -> np.ndarray:
    return (hu_to_mu(hu) / MU_MAX).astype(np.float32)


def _liver_dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    counts = dice_counts(prediction, reference, labels=(LABEL_LIVER,))
    return float(dice_from_counts(counts, absent=float("nan"))[0])


def served_quality(dataset: SimulatedDataset, case: str, reconstructors: list[str | Path], segmenter: str | Path,
                   batch_size: int = 8) -> list[ServedQuality]:
    """g(f(low dose)) and f(low dose) against g(FBP) and the FBP, for one case and each reconstructor.

    Args:
        dataset: a simulated data set holding the case, its full dose, labels and FBP.
        case: the patient.
        reconstructors: f's model files; segmenter: g's (a joint f is segmented by its own g).

    Returns:
        per reconstructor, in order: mean PSNR over the case's slices (disc ROI, normalised
        attenuation) and the per-volume liver Dice of g, for the served reconstruction and
        for the FBP (scored once per g).
    """
    lowdose, fbp = dataset.volume(LOWDOSE, case), dataset.volume("fbp", case)
    refs = [SliceRef(case, k) for k in range(dataset.cases[case]["num_slices"])]
    reference = np.stack([dataset.slice(FULLDOSE, r) for r in refs], axis=-1)
    labels = np.stack([dataset.segmentation(r) for r in refs], axis=-1)

    def mean_psnr(hu: np.ndarray) -> float:
        x = _normalised(hu)
        return float(np.mean([roi_psnr_ssim(x[:, :, k], reference[:, :, k])[0] for k in range(len(refs))]))

    psnr_fbp = mean_psnr(np.asarray(fbp.dataobj))
    fbp_dice: dict[Path, float] = {}  # g's file -> its liver Dice on the FBP
    qualities = []
    for reconstructor in reconstructors:
        f = load_reconstructor(reconstructor)
        g_file = Path(reconstructor if f[1].task == "joint" else segmenter)
        g = (load_segmenter(g_file), read_model(g_file))
        served = reconstruct_and_segment(np.asarray(lowdose.dataobj), lowdose.affine, reconstructor=f, segmenter=g,
                                         batch_size=batch_size)
        if g_file not in fbp_dice:
            on_fbp = reconstruct_and_segment(np.asarray(fbp.dataobj), fbp.affine, segmenter=g, batch_size=batch_size)
            fbp_dice[g_file] = _liver_dice(on_fbp.labels, labels)
        qualities.append(ServedQuality(case, method_name(f[1].task, f[1].weight), len(refs),
                                       mean_psnr(served.reconstruction_hu), psnr_fbp,
                                       _liver_dice(served.labels, labels), fbp_dice[g_file]))
    return qualities


def _test_metrics(run: Path) -> dict[str, dict[str, float]]:
    """Mean test PSNR/SSIM per method, and liver/tumour Dice per volume, from a run's report."""
    report = run / "report"
    metrics: dict[str, dict[str, list[float]]] = {}
    with open(report / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            entry = metrics.setdefault(row["method"], {"psnr": [], "ssim": []})
            entry["psnr"].append(float(row["psnr"]))
            entry["ssim"].append(float(row["ssim"]))
    means = {m: {k: float(np.mean(v)) for k, v in values.items()} for m, values in metrics.items()}
    volume = report / "dice_volume.csv"
    if volume.is_file():
        with open(volume, newline="") as handle:
            rows = list(csv.DictReader(handle))
        for method in means:
            for key, column in (("liver", "dice_volume_liver"), ("tumor", "dice_volume_tumour")):
                values = [float(r[column]) for r in rows if r["method"] == method and r.get(column) not in ("", None)]
                finite = [v for v in values if np.isfinite(v)]  # a patient without tumour has no tumour Dice
                if finite:
                    means[method][f"dice_volume_{key}"] = float(np.mean(finite))
    return means


def export_models(run: str | Path, out: str | Path, names: list[str], default_variant: str,
                  demo_data: str | Path, command: str = "", progress: bool = True) -> dict[str, Any]:
    """Copy models of a ``tact reproduce`` run into a model folder with ``serving.json`` and ``MODEL_CARD.md``.

    Args:
        run: the run folder (``models/<name>/best.pt``, ``dataset/``, ``report/``).
        out: the model folder (created; files replaced atomically).
        names: the models to copy (``segmentation``, ``baseunet``, ``ta0.1``, ...); must
            include ``segmentation``.
        default_variant: the reconstructor served when a request names none.
        demo_data: where the demo studies of ``tact serve`` are (or are prepared, at the
            exported models' settings): :func:`served_quality` runs on their real sample,
            the very data a ``make serve`` user meets.
        command: the command that exported the models, for the card.
        progress: progress bars while the demo studies are simulated.

    Raises:
        DataError: a missing model, report or case.
    """
    run, out = Path(run), Path(out)
    if "segmentation" not in names:
        raise DataError(run, "the exported models must include the segmenter (segmentation)")
    if default_variant not in names or default_variant == "segmentation":
        raise DataError(run, f"the default variant {default_variant!r} must be one of the exported reconstructors")
    files = {name: run / "models" / name / "best.pt" for name in names}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(run, f"no such model file(s): {', '.join(missing)}; run `tact reproduce` to the end first")
    if not (run / "report" / "metrics.csv").is_file():
        raise DataError(run / "report", "no metrics.csv: run `tact reproduce` to the end first")
    dataset = SimulatedDataset(run / "dataset")
    previous = [name for name in read_serving(out).get("models", []) if name not in names]
    foreign = sorted(p.name for p in out.glob("*.pt") if p.stem not in names and p.stem not in previous)
    if foreign:
        raise DataError(out, f"holds model files that no export wrote ({', '.join(foreign)}); the app would serve "
                             "them beside the exported ones: move them away or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        with atomic_path(out / f"{name}.pt") as tmp:
            shutil.copyfile(source, tmp)
    save_json(out / SERVING_FILE, {"default_variant": default_variant, "exported_from": str(run), "models": names})
    for name in previous:  # a model of an earlier export, trained with another g: no longer served
        (out / f"{name}.pt").unlink(missing_ok=True)
    from training.serving import SAMPLE_CASE, prepare_studies

    studies = SimulatedDataset(prepare_studies(out, demo_data, progress=progress).parent)
    order = [default_variant] + [n for n in names if n not in ("segmentation", default_variant)]
    qualities = served_quality(studies, SAMPLE_CASE, [out / f"{name}.pt" for name in order], out / "segmentation.pt")
    card = model_card(dataset, {n: out / f"{n}.pt" for n in names}, _test_metrics(run), qualities, default_variant,
                      command, _training_command(run))
    with atomic_path(out / CARD_FILE) as tmp:
        tmp.write_text(card)
    return {"models": names, "default_variant": default_variant, "quality": asdict(qualities[0])}


def _training_command(run: Path) -> str:
    """The ``tact reproduce`` command that trained a run's models, from its cost record ("" when unknown)."""
    record = run / "cost.json"
    preset = json.loads(record.read_text()).get("preset") if record.is_file() else None
    return f"tact reproduce --preset {preset} --out {run}" if preset else ""


def model_card(dataset: SimulatedDataset, models: dict[str, Path], test: dict[str, dict[str, float]],
               qualities: list[ServedQuality], default_variant: str, command: str, training_command: str = "") -> str:
    """The model card (Markdown) of an exported model folder.

    ``qualities``: :func:`served_quality` on the real sample, the default variant's first.
    """
    quality = qualities[0]
    settings = dataset.settings
    segmenter = read_model(models["segmentation"])
    imaging = segmenter.imaging or {}
    split = dataset.manifest["split"]
    lines = [
        "# TaskAdaptiveCT demo models",
        "",
        "Small models for trying the app, trained on CPU. **Not for clinical use**: they were trained on "
        "simulated low-dose scans of synthetic phantom patients and checked on one real patient.",
        "",
        f"Trained by: `{training_command}`" if training_command else "",
        "",
        f"Exported by: `{command}`" if command else "",
        "",
        "## Data",
        "",
        f"- Training patients: {len(split['train'])} synthetic phantoms (`tact phantom`); validation patients are "
        f"held out of them. Test patients: {', '.join(split['test'])} (the real sample among them: "
        "a 20-slice abdominal CT with a TotalSegmentator liver mask, never trained on).",
        f"- Simulation: {settings['size']} x {settings['size']} px slices, {settings['num_angles']} parallel-beam "
        f"angles, N0 = {settings['photons']:g} photons per detector bin, domain `{settings['domain']}`, "
        f"projector {settings.get('projector', 'astra_cpu')}; low dose = ramp-filter FBP of the noisy data.",
        f"- In-plane pixel spacing of the training data: {imaging.get('pixel_spacing_mm', {}).get('min', float('nan')):.2f}"
        f"-{imaging.get('pixel_spacing_mm', {}).get('max', float('nan')):.2f} mm; the app resamples inputs outside "
        "this range and warns.",
        "",
        "## Models",
        "",
        "| file | task | weight | network | best epoch | validation | test PSNR / SSIM | test Dice per volume (liver / tumour) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, path in models.items():
        model = read_model(path)
        weight = {"reconstruction": "α", "joint": "C"}.get(model.task)
        validation = ", ".join(f"{k[4:]} {v:.3g}" for k, v in model.metrics.items()
                               if k in ("val_psnr", "val_dice_volume", "val_dice_volume_liver", "val_loss"))
        method = "fulldose" if name == "segmentation" else name
        row = test.get(method, {})
        image = f"{row['psnr']:.2f} / {row['ssim']:.3f}" if name != "segmentation" and "psnr" in row else ""
        dice = (f"{row['dice_volume_liver']:.3f} / {row.get('dice_volume_tumor', float('nan')):.3f}"
                if "dice_volume_liver" in row else "")
        if name == "segmentation" and dice:
            dice += " (on the full dose)"
        lines.append(f"| `{name}.pt` | {model.task} | {f'{weight} = {model.weight:g}' if weight else ''} | "
                     f"{model.network.features} features, depth {model.network.depth} | {model.epoch} | {validation} | "
                     f"{image} | {dice} |")
    fbp = test.get("fbp", {})
    lines += [
        f"| (Hann FBP, for comparison) | | | | | | {fbp.get('psnr', float('nan')):.2f} / {fbp.get('ssim', float('nan')):.3f} | "
        f"{fbp.get('dice_volume_liver', float('nan')):.3f} / {fbp.get('dice_volume_tumor', float('nan')):.3f} |",
        "",
        "Test metrics: the run's report (`tact evaluate` on the test patients: PSNR/SSIM inside the disc, mean over "
        "slices; Dice of this g per volume).",
        "",
        f"Default variant: `{default_variant}` ({method_label(default_variant)}), served when a request names none.",
        "Unless the export names one, it is the task-adaptive model with the best validation Dice per volume among "
        f"those whose validation PSNR is within {PSNR_TOLERANCE_DB:g} dB of the best one: task adaptation that keeps "
        "a CT image.",
        "",
        f"## Served on the real sample ({quality.slices} slices)",
        "",
        f"`reconstruct_segment` as the app serves it on study {quality.case} of `tact serve` (the real sample, "
        "simulated at these models' settings), against the Hann FBP of the same noisy data, at the input's "
        "resolution; the full dose and the TotalSegmentator liver mask are the references:",
        "",
        "| | PSNR (dB, disc) | g's liver Dice (per volume) |",
        "|---|---|---|",
        *[f"| served `{q.variant}`{' (default)' if q.variant == default_variant else ''} | {q.psnr_served:.2f} | "
          f"{q.liver_dice_served:.3f} |" for q in qualities],
        f"| Hann FBP | {quality.psnr_fbp:.2f} | {quality.liver_dice_fbp:.3f} |",
        "",
        "## Limits",
        "",
        "- Trained on simulated low dose (parallel beam, Poisson noise, no scatter or beam hardening) of synthetic "
        "phantoms; real scanner data differ.",
        "- Liver masks of the real sample are TotalSegmentator output, not expert labels; its tumour label is empty.",
        "- One training run, one seed: differences of a few hundredths in Dice are within run-to-run variation.",
        "- Not for clinical use.",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


def read_serving(folder: str | Path) -> dict[str, Any]:
    """A model folder's ``serving.json`` (empty when it has none)."""
    path = Path(folder) / SERVING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
