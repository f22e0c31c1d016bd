"""The whole §3 experiment in one command (``tact reproduce``).

Stages, each skipped when a previous run of the same command finished it::

    data          LiTS folder: the user's (--lits), else synthetic phantoms (+ the real sample)
    simulate      paired low-dose / full-dose data set, split by patient
    fbp, bm3d     classical baselines, parameters chosen on training slices
    segmentation  pre-train g on full-dose training slices
    baseunet      f with alpha = 0 (MSE only)
    ta<alpha>     f with the frozen g, for each alpha
    joint<C>      f and g trained together, for each C
    ta<alpha>-<tag>  the preset's variants (another loss form, a warm start, a weaker g, ...),
                  with segmentation-<tag> first where the variant trains its own g
    reconstruct   each trained f applied to the data set
    evaluate      Tables I and II, Figures 3 and 4, training curves
    seed <k>: ... with ``--seeds N``, every stage from ``segmentation`` on again for seeds
                  k = 1 .. N-1 (training seed + k) in ``seeds/<k>/``, on a hard-linked copy of
                  the data set and its baselines
    statistics    ``report/statistics.md``: intervals and paired tests over patients, slices and seeds

Layout of ``RUN/``::

    lits/  dataset/  models/<stage>/  report/  cost.json
    seeds/<k>/dataset/  seeds/<k>/models/<stage>/  seeds/<k>/report/  seeds/<k>/cost.json

``cost.json`` keeps the wall time of every stage (from the run that executed it), and the
report's ``compute_cost.md`` states the total, so the cost of a reproduction is on record
next to its results.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from training.checkpoints import read_model
from training.config import TrainingConfig
from training.dataset import SimulatedDataset, link_dataset
from training.errors import DataError
from training.fileio import atomic_path, save_json
from training.methods import BASE_UNET, method_name
from training.presets import PRESETS, Preset, Variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageCost:
    """Wall time of one stage, and whether this invocation ran it or found it done."""

    stage: str
    seconds: float
    ran: bool


class Reproduction:
    """One reproduction of the experiment in a run folder.

    Args:
        preset: a :class:`~training.presets.Preset` or its name (with
            :meth:`~training.presets.Preset.with_simulation` for other simulation settings).
        out: the run folder.
        lits: a LiTS-format folder; default: synthetic phantoms (plus the real sample where
            the preset includes it).
        workers: processes for simulation, baselines and evaluation (default: every core).
        device: training device (default: CUDA where available).
        progress: progress bars.
        seeds: how many seeds every trained method is trained with (default: the preset's).
        shared_dataset: for a further seed's reproduction only: the data set (with its baselines)
            of the first seed, hard-linked into this run instead of the data stages.
    """

    def __init__(self, preset: Preset | str, out: str | Path, lits: str | Path | None = None,
                 workers: int | None = None, device: str | None = None, progress: bool = True,
                 seeds: int | None = None, shared_dataset: SimulatedDataset | None = None) -> None:
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
            preset = PRESETS[preset]
        self.preset = preset
        self.out = Path(out)
        self.lits = Path(lits) if lits is not None else None
        self.workers, self.device, self.progress = workers, device, progress
        self.seeds = preset.seeds if seeds is None else seeds
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        self.shared_dataset = shared_dataset
        self.costs: list[StageCost] = []
        self._recorded = self._read_costs()
        if self.lits is not None:
            from training.loaders import find_lits_cases

            find_lits_cases(self.lits)  # a clear error now rather than after the first stage

    # -- bookkeeping ----------------------------------------------------------------------

    def _read_costs(self) -> dict[str, float]:
        path = self.out / "cost.json"
        if not path.is_file():
            return {}
        record = json.loads(path.read_text())
        recorded = PRESETS.get(record.get("preset"))
        if record.get("preset") != self.preset.name and (recorded is None or not self.preset.shares_stages_with(recorded)):
            raise DataError(self.out, f"holds a reproduction with preset {record.get('preset')!r}, not "
                                      f"{self.preset.name!r}; use a new --out")
        return dict(record["stages"])

    def _stage(self, name: str, done: bool, action: Callable[[], object]) -> None:
        if done:
            log.info("stage %s: already done", name)
            self.costs.append(StageCost(name, self._recorded.get(name, 0.0), ran=False))
            return
        log.info("stage %s", name)
        start = time.perf_counter()
        action()
        seconds = time.perf_counter() - start
        self._recorded[name] = seconds
        self.costs.append(StageCost(name, seconds, ran=True))
        self._save_costs()

    def _save_costs(self) -> None:
        save_json(self.out / "cost.json", {"preset": self.preset.name, "stages": self._recorded,
                                           "machine": machine_description()})

    # -- stages ---------------------------------------------------------------------------

    @property
    def lits_dir(self) -> Path:
        return self.lits if self.lits is not None else self.out / "lits"

    @property
    def dataset_dir(self) -> Path:
        return self.out / "dataset"

    def model_dir(self, stage: str) -> Path:
        return self.out / "models" / stage

    def seed_dir(self, k: int) -> Path:
        """The run folder of the ``k``-th further seed (k >= 1)."""
        return self.out / "seeds" / str(k)

    @property
    def reports(self) -> list[Path]:
        """The report folder of every seed, seed 0 first."""
        return [self.out / "report", *(self.seed_dir(k) / "report" for k in range(1, self.seeds))]

    def run(self) -> list[StageCost]:
        """Run every stage that is not done yet; returns each stage's cost."""
        self.out.mkdir(parents=True, exist_ok=True)
        dataset = self._prepare_dataset() if self.shared_dataset is None else self._link_dataset(self.shared_dataset)
        methods = self._train_and_evaluate(dataset)
        if self.shared_dataset is None:
            for k in range(1, self.seeds):
                seed = Reproduction(self.preset.with_seed(k), self.seed_dir(k), workers=self.workers, device=self.device,
                                    progress=self.progress, seeds=1, shared_dataset=dataset)
                self.costs += [replace(cost, stage=f"seed {k}: {cost.stage}") for cost in seed.run()]
            self._stage("statistics", False, lambda: self._statistics(methods))
            self._write_cost_report()
        return self.costs

    def _prepare_dataset(self) -> SimulatedDataset:
        """The stages up to the classical baselines: data, simulation, FBP, BM3D."""
        from training.baselines import run_bm3d, run_fbp
        from training.simulate import SimulationSettings, simulate_dataset

        preset = self.preset
        sample_case = str(preset.phantom_volumes) if self.lits is None and preset.include_sample else None
        self._stage("data", self.lits is not None or self._data_written(sample_case), lambda: self._write_phantoms(sample_case))
        settings = SimulationSettings(photons=preset.photons, num_angles=preset.angles, size=preset.size, domain=preset.domain,
                                      test_fraction=preset.test_fraction, test_cases=(sample_case,) if sample_case else ())
        self._check_existing_dataset(settings)
        self._stage("simulate", _complete(self.dataset_dir), lambda: simulate_dataset(self.lits_dir, self.dataset_dir, settings,
                                                                      workers=self.workers, progress=self.progress))
        dataset = SimulatedDataset(self.dataset_dir)
        self._stage("fbp", bool(dataset.methods.get("fbp", {}).get("tuned_on")),
                    lambda: run_fbp(dataset, workers=self.workers, progress=self.progress))
        self._stage("bm3d", dataset.has_method("bm3d"),
                    lambda: run_bm3d(dataset, sweep=preset.bm3d_sweep, workers=self.workers, progress=self.progress))
        return dataset

    def _link_dataset(self, shared: SimulatedDataset) -> SimulatedDataset:
        """A further seed's data set: the first seed's slices and baselines, hard-linked."""
        self._stage("dataset", _complete(self.dataset_dir), lambda: link_dataset(shared, self.dataset_dir))
        return SimulatedDataset(self.dataset_dir)

    def _train_and_evaluate(self, dataset: SimulatedDataset) -> list[str]:
        """g, every reconstructor, their reconstructions and the report; returns the evaluated methods."""
        preset = self.preset
        segmenter = self.model_dir("segmentation") / "best.pt"
        base = self.model_dir(BASE_UNET) / "best.pt"
        self._train("segmentation", preset.config("segmentation"))
        reconstructions = {BASE_UNET: preset.config("reconstruction", 0.0, str(segmenter))}
        for alpha in preset.alphas:
            reconstructions[method_name("reconstruction", alpha)] = preset.config("reconstruction", alpha, str(segmenter))
        for c in preset.cs:
            reconstructions[method_name("joint", c)] = preset.config("joint", c)
        for variant in preset.variants:
            reconstructions[variant.method] = self._variant_config(variant, segmenter, base)
        for stage, config in reconstructions.items():
            self._train(stage, config)
        for stage in reconstructions:
            self._reconstruct(dataset, stage)
        self._stage("evaluate", False, lambda: self._evaluate(dataset, list(reconstructions), segmenter))
        if self.shared_dataset is not None:
            self._write_cost_report()
        return ["lowdose", "fbp", "bm3d", *reconstructions, "fulldose"]

    def _variant_config(self, variant: Variant, segmenter: Path, base: Path) -> TrainingConfig:
        """A variant's training configuration; trains the variant's own g first where it has one."""
        if variant.segmentation_epochs is not None:
            stage = f"segmentation-{variant.tag}"
            self._train(stage, replace(self.preset.config("segmentation"), epochs=variant.segmentation_epochs))
            segmenter = self.model_dir(stage) / "best.pt"
        config = self.preset.config("reconstruction", variant.alpha, str(segmenter))
        return replace(config, network=replace(config.network, upsample=variant.upsample),
                       init_checkpoint=str(base) if variant.warm_start else None,
                       loss_reference=str(base) if variant.normalised else None)

    def _statistics(self, methods: list[str]) -> None:
        from training.statistics import write_statistics

        write_statistics(self.reports, methods, self.out / "report",
                         title=f"`tact reproduce --preset {self.preset.name} --seeds {self.seeds}`")

    def _check_existing_dataset(self, settings) -> None:
        """Refuse a run folder whose data set was simulated with other settings (a finished one would be reused)."""
        manifest = self.dataset_dir / "dataset.json"
        if not manifest.is_file():
            return
        recorded = json.loads(manifest.read_text()).get("simulation", {})
        wanted = {"photons": settings.photons, "num_angles": settings.num_angles, "size": settings.size,
                  "domain": settings.domain}
        differ = {key: (recorded.get(key), value) for key, value in wanted.items() if recorded.get(key) != value}
        if differ:
            shown = ", ".join(f"{key} {_shown(old)} (asked: {_shown(new)})" for key, (old, new) in differ.items())
            raise DataError(manifest, f"this run's data set was simulated with {shown}; use a new --out for other "
                                      "simulation settings")

    def _data_record(self, sample_case: str | None) -> dict[str, object]:
        """What the data stage writes: phantoms, the sample's case id, further real patients by case id."""
        first = self.preset.phantom_volumes + (sample_case is not None)
        record: dict[str, object] = {"phantoms": self.preset.phantom_volumes, "sample_case": sample_case}
        if self.preset.real_patients:
            record["real_patients"] = {str(first + i): name for i, name in enumerate(self.preset.real_patients)}
        return record

    def _data_written(self, sample_case: str | None) -> bool:
        """Whether the data stage is done; a run folder holding other patients is refused."""
        marker = self.out / "lits" / ".complete"
        if not marker.is_file():
            return False
        recorded, wanted = json.loads(marker.read_text()), self._data_record(sample_case)
        if recorded != wanted:
            raise DataError(marker, f"this run's patients are {recorded}, the {self.preset.name} preset's are {wanted}; "
                                    "use a new --out")
        return True

    def _write_phantoms(self, sample_case: str | None) -> None:
        from training.phantom import write_phantom_dataset
        from training.sample_data import load_real_case, load_sample
        from training.volume import write_lits_case

        lits = self.out / "lits"
        record = self._data_record(sample_case)
        # Real patients first: a failed download or check leaves no half-written data stage behind.
        real = [(case, load_real_case(name, case_id=case)) for case, name in dict(record.get("real_patients", {})).items()]
        sample = load_sample() if sample_case is not None else None
        write_phantom_dataset(lits, self.preset.phantom_volumes, size=self.preset.size, slices=self.preset.phantom_slices,
                              seed=0, progress=self.progress)
        if sample is not None:
            write_lits_case(lits, int(sample_case), sample)
        for case, volume in real:
            write_lits_case(lits, int(case), volume)
        (lits / ".complete").write_text(json.dumps(record))

    def _train(self, stage: str, config: TrainingConfig) -> None:
        from training.engine import check_run_folder, read_summary, train

        run = self.model_dir(stage)
        done = read_summary(run) is not None
        if done:  # a finished stage of another configuration (e.g. a variant of another preset) is not reused
            check_run_folder(run, config)
        self._stage(stage, done, lambda: train(config, self.dataset_dir, run, device=self.device, progress=self.progress))

    def _reconstruct(self, dataset: SimulatedDataset, stage: str) -> None:
        from training.inference import reconstruct_dataset

        checkpoint = self.model_dir(stage) / "best.pt"
        record = dataset.methods.get(stage, {})
        current = (dataset.has_method(stage) and record.get("checkpoint") == str(checkpoint.resolve())
                   and record.get("epoch") == read_model(checkpoint).epoch)
        self._stage(f"reconstruct {stage}", current,
                    lambda: reconstruct_dataset(dataset, checkpoint, method=stage, device=self.device, progress=self.progress))

    def _evaluate(self, dataset: SimulatedDataset, trained: list[str], segmenter: Path) -> None:
        from training.curves import plot_training_curves
        from training.evaluate import evaluate_dataset

        methods = ["lowdose", "fbp", "bm3d", *trained, "fulldose"]
        report = self.out / "report"
        evaluate_dataset(SimulatedDataset(dataset.root), methods, report, split="test", figures=self.preset.figures,
                         workers=self.workers, progress=self.progress, segmenter=segmenter, device=self.device)
        runs = {"segmentation": self.model_dir("segmentation"), **{m: self.model_dir(m) for m in trained}}
        plot_training_curves(runs, report / "figures" / "training_curves.png")

    def _write_cost_report(self) -> None:
        total = sum(cost.seconds for cost in self.costs)
        lines = [f"Compute cost of `tact reproduce --preset {self.preset.name}`", "",
                 f"Machine: {machine_description()}.", "",
                 "| stage | wall time | this invocation |", "|---|---|---|"]
        lines += [f"| {c.stage} | {format_seconds(c.seconds)} | {'ran' if c.ran else 'already done'} |" for c in self.costs]
        lines += [f"| **total** | **{format_seconds(total)}** | |", ""]
        with atomic_path(self.out / "report" / "compute_cost.md") as tmp:
            tmp.write_text("\n".join(lines))


def _complete(root: Path) -> bool:
    """Whether ``root`` holds a finished simulated data set."""
    try:
        SimulatedDataset(root)
    except DataError:
        return False
    return True


def machine_description() -> str:
    """CPU cores and GPU of this machine, for the cost record."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU core(s) ({platform.processor() or platform.machine()}), {gpu}"


def format_seconds(seconds: float) -> str:
    """``1 h 02 min``, ``3 min 05 s`` or ``12.3 s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def _shown(value: object) -> str:
    """A setting as a user typed it: ``300`` for 300.0, strings as they are."""
    return f"{value:g}" if isinstance(value, float) else str(value)
