"""Automatic choice of alpha (``tact train reconstruction --alpha auto``), on validation patients only.

The paper leaves the choice of alpha to future work. The search here is successive halving
over a grid of alphas: every candidate is trained for a quarter of the configured epochs,
the better half is trained on to half of them, and the best one to the end; each
candidate is one ordinary run that is continued, not restarted, so its learning-rate
schedule and early stopping are those of a full run.

The rule (:func:`rank`): among the alphas whose validation PSNR is within
``tolerance_db`` (2 dB) of the Base U-Net's, the highest validation Dice (per volume,
convention (c), the mean of liver and tumour) wins; where none is within it, the highest
PSNR. A candidate's figures are those of its best epoch so far (by its own validation
loss), i.e. of the model file the run would deliver. The Base U-Net's validation PSNR comes
from ``--baseline`` (a Base U-Net model file trained on the same validation patients), or
from a Base U-Net that the search trains first.

Cost, in epochs of a task-adaptive training: with the default 5 alphas, 5/4 + 2/4 + 1/2 =
2.25 full trainings, plus the Base U-Net's when the search trains one (an epoch of the
Base U-Net costs about half of a task-adaptive one: no pass through g); early stopping
only lowers it. :data:`MAX_COST_IN_TRAININGS` bounds it.

Layout of the output folder: the chosen alpha's run (``config.yaml``, ``best.pt`` and the
rest, as ``tact train`` leaves it) plus ``alpha_search.json`` and ``alpha_search.md`` (every
alpha tried, at every rung, with its validation figures) and ``search/`` (the candidates'
runs, and the Base U-Net's). Started again, the search resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from training.checkpoints import read_model
from training.config import ConfigError, TrainingConfig
from training.dataset import SimulatedDataset
from training.engine import read_history, read_summary, train, validation_cases
from training.errors import DataError
from training.fileio import atomic_path, save_json
from training.methods import method_name

log = logging.getLogger(__name__)

DEFAULT_GRID = (0.01, 0.03, 0.1, 0.3, 0.9)
PSNR_TOLERANCE_DB = 2.0
"""How far below the Base U-Net's validation PSNR an alpha may fall and still be chosen by Dice."""
RUNG_FRACTIONS = (0.25, 0.5, 1.0)
"""The share of the configured epochs each rung trains its candidates to."""
MAX_COST_IN_TRAININGS = 3.0
SEARCH_FILE = "alpha_search.json"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class Candidate:
    """One alpha at one rung: its validation figures at its best epoch so far."""

    alpha: float
    rung: int
    epochs: int
    best_epoch: int
    val_psnr: float
    val_dice: float
    stopped_early: bool


def rank(candidates: list[Candidate], base_psnr: float, tolerance_db: float = PSNR_TOLERANCE_DB) -> list[Candidate]:
    """Best first: within ``tolerance_db`` of ``base_psnr`` by validation Dice, then the rest by PSNR.

    NaN figures rank last.
    """
    def key(candidate: Candidate) -> tuple[int, float]:
        within = candidate.val_psnr >= base_psnr - tolerance_db
        value = candidate.val_dice if within else candidate.val_psnr
        return (0 if within else 1, -value if math.isfinite(value) else math.inf)

    return sorted(candidates, key=key)


def schedule(epochs: int, count: int) -> list[tuple[int, int]]:
    """``(epochs to train to, candidates trained)`` per rung: every candidate first, then halves."""
    rungs, alive = [], count
    for fraction in RUNG_FRACTIONS:
        rungs.append((max(1, math.ceil(fraction * epochs)), alive))
        alive = max(1, alive // 2)
    return rungs


def search_cost(epochs: int, count: int, with_baseline: bool, baseline_epoch_cost: float = 0.5) -> float:
    """The search's cost in full task-adaptive trainings, if no run stops early."""
    trained, cost = 0, 0.0
    for until, alive in schedule(epochs, count):
        cost += alive * (until - trained) / epochs
        trained = until
    return cost + (baseline_epoch_cost if with_baseline else 0.0)


def _candidate(run: Path, alpha: float, rung: int) -> Candidate:
    model = read_model(run / "best.pt")
    history_epochs = len(read_history(run))
    summary = read_summary(run)
    return Candidate(alpha=alpha, rung=rung, epochs=history_epochs, best_epoch=model.epoch,
                     val_psnr=model.metrics.get("val_psnr", math.nan), val_dice=model.metrics.get("val_dice_volume", math.nan),
                     stopped_early=bool(summary and summary.stopped_early))


def _baseline_psnr(baseline: Path, config: TrainingConfig, dataset: SimulatedDataset) -> float:
    """The Base U-Net's validation PSNR, refused unless it was validated on this search's patients."""
    model = read_model(baseline)
    if model.task != "reconstruction" or model.weight != 0.0:
        raise DataError(baseline, f"is a {model.task} model with weight {model.weight:g}, not a Base U-Net "
                                  "(`tact train reconstruction --alpha 0`)")
    if "val_psnr" not in model.metrics:
        raise DataError(baseline, "has no validation PSNR (it was trained without validation patients)")
    summary_path = baseline.parent / "summary.json"
    expected = validation_cases(dataset.case_ids("train"), config.validation_fraction, config.seed)
    recorded = json.loads(summary_path.read_text()).get("split", {}).get("validation") if summary_path.is_file() else None
    if recorded != expected:
        raise DataError(baseline, f"was validated on patients {recorded} (its run's summary.json), this search "
                                  f"validates on {expected}; give a Base U-Net of the same data set, seed and "
                                  "validation_fraction, or leave --baseline out to train one")
    return float(model.metrics["val_psnr"])


def _read_state(search: Path, config: TrainingConfig, grid: tuple[float, ...], tolerance_db: float,
                base_psnr: float) -> dict:
    """The rungs an earlier invocation finished; a search folder of other settings is refused."""
    # The configuration without its weight, which the search sets (a weight of 0 would be refused
    # together with the normalised loss).
    searched = {key: value for key, value in asdict(config).items() if key != "weight"}
    settings = {"config": searched, "grid": list(grid), "tolerance_db": tolerance_db, "base_psnr": base_psnr}
    path = search / STATE_FILE
    if not path.is_file():
        return {"settings": settings, "rungs": []}
    state = json.loads(path.read_text())
    if state.get("settings") != json.loads(json.dumps(settings)):
        raise ConfigError(f"{search} holds an alpha search with other settings (configuration, grid, tolerance or "
                          "Base U-Net); use a new --out")
    return state


def search_alpha(config: TrainingConfig, dataset: SimulatedDataset | str | Path, out: str | Path,
                 grid: tuple[float, ...] = DEFAULT_GRID, baseline: str | Path | None = None,
                 tolerance_db: float = PSNR_TOLERANCE_DB, device: str | None = None, progress: bool = True) -> dict:
    """Choose alpha by successive halving on validation patients and leave the chosen run in ``out``.

    Args:
        config: the task-adaptive configuration (its ``weight`` is ignored); it needs a
            segmenter and validation patients.
        dataset: the data set from ``tact simulate``.
        out: the output folder (see the module docstring).
        grid: the alphas tried, each in (0, 1].
        baseline: a Base U-Net model file validated on the same patients; ``None`` trains one.
        tolerance_db: the PSNR tolerance of the rule.
        device, progress: as for :func:`training.engine.train`.

    Returns:
        the record written to ``alpha_search.json``.

    Raises:
        ConfigError, DataError: before any training, for settings that cannot work.
    """
    out = Path(out)
    dataset = dataset if isinstance(dataset, SimulatedDataset) else SimulatedDataset(dataset)
    if config.task != "reconstruction":
        raise ConfigError("--alpha auto chooses the weight of task-adaptive training (`tact train reconstruction`)")
    if config.segmenter_checkpoint is None:
        raise ConfigError("--alpha auto needs the pre-trained segmentation network: pass --segmenter")
    if config.validation_fraction == 0.0:
        raise ConfigError("--alpha auto chooses on validation patients; validation_fraction must be above 0")
    grid = tuple(sorted(set(float(a) for a in grid)))
    if len(grid) < 2 or not all(0.0 < a <= 1.0 for a in grid):
        raise ConfigError(f"the alpha grid needs at least two values in (0, 1], got {list(grid)}")
    if not tolerance_db >= 0:
        raise ConfigError(f"the PSNR tolerance must not be negative, got {tolerance_db}")
    cost = search_cost(config.epochs, len(grid), with_baseline=baseline is None)
    if cost > MAX_COST_IN_TRAININGS:
        raise ConfigError(f"{len(grid)} alphas would cost {cost:.2f} full trainings (at most {MAX_COST_IN_TRAININGS:g}); "
                          "use a shorter grid")
    search = out / "search"
    if baseline is None:
        baseline_run = search / "baseunet"
        base_config = replace(config, weight=0.0, loss_reference=None, init_checkpoint=None)
        log.info("alpha search: training the Base U-Net for the PSNR of the rule")
        train(base_config, dataset, baseline_run, device=device, progress=progress)
        baseline = baseline_run / "best.pt"
    base_psnr = _baseline_psnr(Path(baseline), config, dataset)

    runs = {alpha: search / method_name("reconstruction", alpha) for alpha in grid}
    state = _read_state(search, config, grid, tolerance_db, base_psnr)
    alive, tried, trained_epochs = list(grid), [], 0
    for rung, (until, count) in enumerate(schedule(config.epochs, len(grid))):
        alive = alive[:count]
        if rung < len(state["rungs"]):  # finished by an earlier invocation: its figures as they were then
            results = [Candidate(**c) for c in state["rungs"][rung]]
        else:
            log.info("alpha search, rung %d: %s to epoch %d of %d", rung + 1, ", ".join(f"{a:g}" for a in alive), until,
                     config.epochs)
            for alpha in alive:
                train(replace(config, weight=alpha), dataset, runs[alpha], device=device, progress=progress, until=until)
            results = [_candidate(runs[alpha], alpha, rung + 1) for alpha in alive]
            state["rungs"].append([asdict(c) for c in results])
            save_json(search / STATE_FILE, state)
        tried += results
        alive = [candidate.alpha for candidate in rank(results, base_psnr, tolerance_db)]
        trained_epochs = until
    chosen = alive[0]
    _publish(runs[chosen], out)
    record = {"rule": f"highest validation Dice (per volume) among alphas within {tolerance_db:g} dB of the Base U-Net's "
                      "validation PSNR, else the highest PSNR",
              "tolerance_db": tolerance_db, "base_psnr": base_psnr, "baseline": str(Path(baseline).resolve()), "grid": list(grid),
              "schedule": [{"epochs": u, "candidates": c} for u, c in schedule(config.epochs, len(grid))],
              "cost_in_trainings": cost, "trained_epochs": trained_epochs, "chosen": chosen,
              "candidates": [asdict(candidate) for candidate in tried]}
    save_json(out / SEARCH_FILE, record)
    _write_table(out / "alpha_search.md", record)
    log.info("alpha search: chose alpha = %g (validation PSNR and Dice in %s)", chosen, out / SEARCH_FILE)
    return record


_RUN_FILES = ("config.yaml", "inputs.json", "best.pt", "last.pt", "history.csv", "summary.json")


def _publish(run: Path, out: Path) -> None:
    """Copy the chosen run's files into ``out``, each atomically, so ``out`` is a normal run folder."""
    out.mkdir(parents=True, exist_ok=True)
    for name in _RUN_FILES:
        with atomic_path(out / name) as tmp:
            shutil.copyfile(run / name, tmp)
    if (run / "tensorboard").is_dir():
        shutil.copytree(run / "tensorboard", out / "tensorboard", dirs_exist_ok=True)


def _write_table(path: Path, record: dict) -> None:
    lines = ["# Automatic alpha", "", f"Rule: {record['rule']}. Base U-Net validation PSNR: {record['base_psnr']:.2f} dB.",
             f"Chosen: alpha = {record['chosen']:g}. Cost: at most {record['cost_in_trainings']:.2f} full trainings.", "",
             "| rung | alpha | epochs | best epoch | val PSNR (dB) | val Dice (c) | within tolerance |",
             "|---|---|---|---|---|---|---|"]
    tolerance = record["tolerance_db"]
    for c in record["candidates"]:
        within = c["val_psnr"] >= record["base_psnr"] - tolerance
        lines.append(f"| {c['rung']} | {c['alpha']:g} | {c['epochs']} | {c['best_epoch']} | {c['val_psnr']:.2f} | "
                     f"{c['val_dice']:.3f} | {'yes' if within else 'no'} |")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
