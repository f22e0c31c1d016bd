"""Training throughput and peak memory of the paper's U-Nets, and the wall time they imply.

Measures the training step exactly as `tact train` runs it (``training.engine``'s
``TrainingTask`` and ``TrainingStep``: forward, loss, backward, Adam step, with the
engine's autocast, gradient scaler and memory format), for the four kinds of training in
the experiment:

* ``segmentation``: pre-training of g alone on full-dose slices (soft Dice loss);
* ``base``: the Base U-Net, f with MSE only (alpha = 0);
* ``task-adaptive``: f with ``(1 - alpha) MSE + alpha Dice(g(f(x)))``, g loaded from a
  model file and frozen: g forward, and backward through g into f;
* ``joint``: f and g trained together (weight C), both optimised by Adam;
* ``normalised``: task-adaptive with the normalised loss (``loss_reference``): the same
  step with each term divided by its reference scale, plus the one-off pass of the
  reference f and g over the validation slices that measures those scales (timed per slice
  and projected onto the preset's validation slices).

After the table, the cost of ``--alpha auto`` (successive halving over the default grid)
is stated in task-adaptive trainings (``training.alpha_search.search_cost``) and, from the
measured task-adaptive rate, in minutes beside one plain task-adaptive training of the
same configuration.

Each kind also gets a validation row (``training.engine.ValidationStep``: forward and
metrics, no gradients), which is what every epoch ends with. Inputs are random tensors of
the right shape and dtype: the cost of these networks does not depend on the values. Data
loading is not measured (the loader's workers overlap it with the step).

Two configurations: ``paper`` (the ``paper`` preset: 512² slices, U-Nets of 64 -> 1024
features, depth 4, its batch size) and ``cpu`` (the ``cpu`` preset's size, network and
batch size). On CUDA every row is measured in fp32 and with autocast (bf16 where the GPU
supports it, else fp16 with a gradient scaler), each with and without channels-last, the
settings the engine offers; on CPU the engine always trains in fp32, contiguous, and the
paper config runs at batch 1 unless ``--batch`` says otherwise (its batch of 8 would take
minutes per step and some 12-25 GB; on CPU slices/s hardly depends on the batch).

How to read it: ``slices/s`` is training (or validation) slices per second of one process
on one device, after warm-up iterations that are not timed. ``peak memory`` is, on CUDA,
``torch.cuda.max_memory_allocated`` of the row (weights, optimiser state, activations);
on CPU, the growth of the process's peak resident set size (``ru_maxrss``, its count
restarted once the imports are done) over its resident size just before the networks are
built, each kind measured in a fresh process so that peaks do not carry over.
The projection then multiplies the measured rates by the slices and epochs of
``tact reproduce --preset paper`` on the paper's 19,163 slices: an upper bound (no early
stopping) of the training wall time on one such device, set beside the paper's 23 h 38 min
on 4 x A100.

    .venv/bin/python benchmarks/train.py [--configs paper cpu] [--device cpu|cuda]
        [--steps segmentation base task-adaptive joint normalised] [--iterations N] [--warmup N] [--batch N]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

CONFIGS = ("paper", "cpu")
STEPS = ("segmentation", "base", "task-adaptive", "joint", "normalised")
PROJECTED_STEPS = ("segmentation", "base", "task-adaptive", "joint")
"""The kinds of training `tact reproduce --preset paper` runs, which the projection needs."""
STEP_NAMES = {"segmentation": "segmentation (g)", "base": "Base U-Net (f, MSE)",
              "task-adaptive": "task-adaptive (f, frozen g)", "joint": "joint (f and g)",
              "normalised": "task-adaptive, normalised loss"}
# (autocast, channels-last): the two switches of TrainingConfig that act on CUDA only.
CUDA_VARIANTS = {"fp32": (False, False), "fp32-cl": (False, True), "amp": (True, False), "amp-cl": (True, True)}

PAPER_SLICES = 19_163
"""Slices with a non-empty segmentation the paper kept from LiTS (its §3)."""
PAPER_TRAIN_FRACTION = 0.8
PAPER_WALL_HOURS = 23 + 38 / 60
"""The paper's whole training and testing on 4 x A100 80 GB, 4 trainings at once."""
PAPER_DEVICES = 4
CPU_PAPER_BATCH = 1
"""Batch of the paper config on CPU: its batch of 8 takes minutes per step and 12-25 GB."""


@dataclass(frozen=True)
class Row:
    """One configuration x training kind x precision, measured in one child process."""

    config: str
    step: str
    device: str
    variant: str  # "fp32" on CPU; a CUDA_VARIANTS key on CUDA
    batch: int
    warmup: int
    iterations: int


# ---------------------------------------------------------------------------------------
# Child: one row, in a fresh process, printed as JSON


def _peak_rss_mib() -> float:
    """This process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def _restart_peak_rss() -> float:
    """Restart the peak-RSS count at the current RSS and return it (MiB).

    Importing torch and MONAI briefly needs more memory than they keep; without a restart
    that transient would hide the growth of small networks. Linux restarts the count on a
    write of 5 to /proc/self/clear_refs; elsewhere the peak so far is the baseline.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text()
    except OSError:
        return _peak_rss_mib()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Time validation then training of one row; returns rates, seconds per iteration and peaks."""
    import torch

    from training.engine import TrainingStep, TrainingTask, ValidationStep
    from training.presets import PRESETS

    row = Row(**{k: spec[k] for k in Row.__dataclass_fields__})
    preset = PRESETS[row.config]
    amp, channels_last = CUDA_VARIANTS[row.variant] if row.device == "cuda" else (False, False)
    task_name, weight, segmenter = {
        "segmentation": ("segmentation", 0.0, None),
        # As `tact reproduce` does: the Base U-Net gets g too, to monitor validation Dice.
        "base": ("reconstruction", 0.0, spec["segmenter"]),
        "task-adaptive": ("reconstruction", preset.alphas[len(preset.alphas) // 2], spec["segmenter"]),
        # Joint training starts g from scratch in `tact reproduce`.
        "joint": ("joint", preset.cs[len(preset.cs) // 2], None),
        "normalised": ("reconstruction", preset.alphas[len(preset.alphas) // 2], spec["segmenter"]),
    }[row.step]
    config = preset.config(task_name, weight, segmenter)
    config = replace(config, batch_size=row.batch, amp=amp, channels_last=channels_last,
                     loss_reference=spec["reference"] if row.step == "normalised" else None)

    cuda = row.device == "cuda"
    device = torch.device("cuda:0" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    gc.collect()
    rss_before = _restart_peak_rss()
    task = TrainingTask(config, device)
    optimizer = torch.optim.Adam(task.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    train_step, validation_step = TrainingStep(task), ValidationStep(task)
    size, b = preset.size, row.batch
    batch = {"image": torch.rand(b, 1, size, size), "fulldose": torch.rand(b, 1, size, size),
             "label": torch.randint(0, 3, (b, 1, size, size), dtype=torch.int64)}
    cases = ["0"] * b  # the validation step sums Dice counts per patient
    if cuda:  # the loader pins memory on CUDA, so the copy in task.batch is the same as in training
        batch = {k: v.pin_memory() for k, v in batch.items()}
    batch["case"] = cases
    engine = SimpleNamespace(optimizer=optimizer, state=SimpleNamespace(iteration=0))

    def timed(step: Any) -> float:
        for _ in range(row.warmup):
            step(engine, batch)
        sync()
        start = time.perf_counter()
        for i in range(row.iterations):
            engine.state.iteration = i + 1
            step(engine, batch)
        sync()
        return (time.perf_counter() - start) / row.iterations

    result: dict[str, Any] = {"threads": torch.get_num_threads(),
                              "precision": (str(task.amp_dtype).removeprefix("torch.") + " autocast") if task.amp else "fp32",
                              "layout": "channels-last" if task.channels_last else "contiguous"}
    try:
        # Validation first: on CPU the peak RSS only grows, so the smaller (inference)
        # peak must be read before training raises it.
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        result["validation_s"] = timed(validation_step)
        result["validation_peak_mib"] = (torch.cuda.max_memory_allocated(device) / 2**20 if cuda
                                         else _peak_rss_mib() - rss_before)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        result["train_s"] = timed(train_step)
        result["train_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mib() - rss_before
        if row.step == "normalised":  # the one-off reference pass, after the step: measure_loss_scales drops the reference
            slices = [{key: batch[key][i] for key in ("image", "fulldose", "label")} for i in range(b)] * max(row.iterations, 1)
            sync()
            start = time.perf_counter()
            task.measure_loss_scales(slices)
            sync()
            result["reference_s_per_slice"] = (time.perf_counter() - start) / len(slices)
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
    return result


# ---------------------------------------------------------------------------------------
# Parent: rows in subprocesses, the table and the projection


def measure(row: Row, segmenter: str, reference: str) -> dict[str, Any]:
    """Run one row in a fresh interpreter (so its memory peak is its own) and read its JSON."""
    spec = {**row.__dict__, "segmenter": segmenter, "reference": reference}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:  # e.g. killed for host memory: report it, keep the other rows
        return {"error": f"child exited with status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    return (f"{days} d " if days else "") + f"{hours} h {minutes:02d} min"


def _makespan(durations: list[float], devices: int) -> float:
    """Longest device's total when jobs are handed out longest first to the least-loaded device."""
    loads = [0.0] * devices
    for duration in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += duration
    return max(loads)


def projection(results: dict[str, dict[str, Any]], label: str) -> list[str]:
    """Projected wall time of `tact reproduce --preset paper` training from the paper rows of one variant."""
    from training.presets import PRESETS

    preset = PRESETS["paper"]
    fit_slices, validation_slices = split_slices("paper")
    runs = [("segmentation", preset.segmentation_epochs, 1), ("base", preset.training.epochs, 1),
            ("task-adaptive", preset.training.epochs, len(preset.alphas)), ("joint", preset.training.epochs, len(preset.cs))]
    per_run = {step: _training_seconds("paper", results[step], epochs) for step, epochs, _ in runs}
    sequential = sum(per_run[step] * count for step, _, count in runs)
    reconstruction_runs = [per_run[step] for step, _, count in runs[1:] for _ in range(count)]
    # g must be trained before the reconstruction runs that load it; then 4 run at once.
    parallel = per_run["segmentation"] + _makespan(reconstruction_runs, PAPER_DEVICES)
    lines = [f"**{label}**"]
    for step, epochs, count in runs:
        lines.append(f"- {STEP_NAMES[step]}: {count} run(s) x {epochs} epochs x ({fit_slices} training + "
                     f"{validation_slices} validation slices) = {_duration(per_run[step])} per run")
    lines.append(f"- all 8 trainings one after another on one device: **{_duration(sequential)}** "
                 f"({sequential / 3600 / PAPER_WALL_HOURS:.2f}x the paper's 23 h 38 min)")
    lines.append(f"- on {PAPER_DEVICES} such devices, g first, then the 7 reconstruction trainings "
                 f"{PAPER_DEVICES} at a time as the paper did: {_duration(parallel)} "
                 f"({parallel / 3600 / PAPER_WALL_HOURS:.2f}x the paper's 23 h 38 min)")
    return lines


def split_slices(config: str) -> tuple[int, int]:
    """(training, validation) slices of a configuration's trainings: the paper's 19,163 slices for
    ``paper``, the phantom slices for the others (their real patients add a few), split by the
    preset's fractions (approximately: the split is by patient)."""
    from training.presets import PRESETS

    preset = PRESETS[config]
    if config == "paper":
        train = round(PAPER_SLICES * PAPER_TRAIN_FRACTION)
    else:
        train = round(preset.phantom_volumes * preset.phantom_slices * (1 - preset.test_fraction))
    validation = round(train * preset.training.validation_fraction)
    return train - validation, validation


def _training_seconds(config: str, result: dict[str, Any], epochs: int) -> float:
    """Wall time of ``epochs`` epochs of one training of ``config`` at the measured rates (no early stop)."""
    fit, validation = split_slices(config)
    return epochs * (fit * result["train_s"] + validation * result["validation_s"]) / result["batch"]


def option_costs(config: str, rows: dict[str, dict[str, Any]], variant: str) -> list[str]:
    """The normalised loss and the alpha search against one plain task-adaptive training of ``config``."""
    from training.alpha_search import DEFAULT_GRID, search_cost
    from training.presets import PRESETS

    plain = rows.get("task-adaptive")
    if plain is None or "error" in plain:
        return [f"({config} {variant}: no option costs without a task-adaptive row)"]
    epochs = PRESETS[config].training.epochs
    fit, validation = split_slices(config)
    one = _training_seconds(config, plain, epochs)
    lines = [f"**Options against one plain task-adaptive training, {config} {variant}** ({epochs} epochs x ({fit} "
             f"training + {validation} validation slices) = {one / 60:.1f} min at the measured rate, no early stop):"]
    normalised = rows.get("normalised")
    if normalised is not None and "error" not in normalised:
        run = _training_seconds(config, normalised, epochs) + validation * normalised["reference_s_per_slice"]
        lines.append(f"- normalised loss: step {normalised['train_s'] / plain['train_s']:.2f}x the plain step's time, "
                     f"plus {validation * normalised['reference_s_per_slice']:.1f} s once for the reference's scales on "
                     f"{validation} validation slices: {run / 60:.1f} min per training ({run / one:.2f}x)")
    for with_baseline in (False, True):
        cost = search_cost(epochs, len(DEFAULT_GRID), with_baseline=with_baseline)
        lines.append(f"- --alpha auto over {len(DEFAULT_GRID)} alphas, "
                     f"{'training its own Base U-Net' if with_baseline else 'with --baseline given'}: at most "
                     f"{cost:.2f} trainings = {cost * one / 60:.1f} min")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                        help="configurations to measure (default: both); the projection needs 'paper'")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                        help="training kinds to measure (default: all five); the projection needs the first four")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to train on (default: cuda where available, else cpu)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="timed iterations per row (default: on CPU 2 for paper, 10 for cpu; on CUDA 20 and 50)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed iterations before timing (default: on CPU 1 for paper, 3 for cpu; on CUDA 5 and 10)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size for every configuration (default: the preset's; on CPU the paper config "
                             f"uses {CPU_PAPER_BATCH}: its batch of 8 needs minutes per step and 12-25 GB, and on CPU "
                             "slices/s barely depends on the batch)")
    parser.add_argument("--variants", nargs="+", choices=list(CUDA_VARIANTS), default=list(CUDA_VARIANTS),
                        help="CUDA only: fp32 or autocast ('amp'), '-cl' with channels-last (default: all four)")
    parser.add_argument("--child", metavar="JSON", default=None,
                        help="internal: measure the one row described by JSON and print its result as JSON")
    args = parser.parse_args()

    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    import torch

    from training.checkpoints import RECONSTRUCTOR, SEGMENTER, save_model
    from training.networks import build_reconstruction_net, build_segmentation_net
    from training.presets import PRESETS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    variants = args.variants if device == "cuda" else ["fp32"]
    for name, value in (("--iterations", args.iterations), ("--warmup", args.warmup), ("--batch", args.batch)):
        if value is not None and value < (0 if name == "--warmup" else 1):
            parser.error(f"{name} must be {'non-negative' if name == '--warmup' else 'positive'}")

    def default(config: str, cpu: tuple[int, int], cuda: tuple[int, int]) -> int:
        return (cpu if device == "cpu" else cuda)[CONFIGS.index(config)]

    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, device {device} ({device_name}), torch threads {torch.get_num_threads()}")
    if device == "cpu":
        print("CPU: fp32 only (the engine turns autocast and channels-last off on CPU); peak memory is the growth "
              "of the process's peak RSS (resource.getrusage ru_maxrss, restarted via /proc/self/clear_refs) over "
              "its RSS before the networks are built, one fresh process per training kind")
    else:
        print("CUDA: peak memory is torch.cuda.max_memory_allocated of each pass (weights, optimiser state, "
              "activations; not the caching allocator's reserve), one fresh process per row")
    sys.stdout.flush()  # keep the header above the progress lines when both streams go to one file

    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    table = ["| config | size | network | step | pass | device | precision | layout | batch | iterations | slices/s "
             "| s/iteration | peak memory MiB |",
             "|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            preset = PRESETS[config]
            network = preset.training.network
            g_network = preset.config("segmentation").network  # g keeps its own architecture under f
            # A random g and a random Base U-Net in model files: both are loaded from one, as in training.
            segmenter = str(Path(tmp) / f"{config}-segmenter.pt")
            save_model(segmenter, "segmentation", 0.0, g_network, {SEGMENTER: build_segmentation_net(g_network)}, 0, {})
            reference = str(Path(tmp) / f"{config}-baseunet.pt")
            save_model(reference, "reconstruction", 0.0, network, {RECONSTRUCTOR: build_reconstruction_net(network)}, 0, {})
            batch = args.batch or (CPU_PAPER_BATCH if device == "cpu" and config == "paper" else preset.training.batch_size)
            for variant in variants:
                for step in args.steps:
                    row = Row(config, step, device, variant, batch,
                              args.warmup if args.warmup is not None else default(config, (1, 3), (5, 10)),
                              args.iterations or default(config, (2, 10), (20, 50)))
                    started = time.perf_counter()
                    result = {**measure(row, segmenter, reference), "batch": batch}
                    results[config, variant, step] = result
                    print(f"  measured {config} {step} {variant} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
                    nets = network if step != "segmentation" else g_network
                    head = (f"| {config} | {preset.size}² | {nets.features}->{nets.filters[-1]}, depth {nets.depth} "
                            f"| {STEP_NAMES[step]} |")
                    if "error" in result:
                        table.append(f"{head} train | {device} | {variant} | | {batch} | {row.iterations} | "
                                     f"{result['error']} | | |")
                        continue
                    for name, key in (("train", "train"), ("validation", "validation")):
                        seconds = result[f"{key}_s"]
                        table.append(f"{head} {name} | {device} | {result['precision']} | {result['layout']} | {batch} "
                                     f"| {row.iterations} | {batch / seconds:.2f} | {seconds:.3f} "
                                     f"| {result[f'{key}_peak_mib']:.0f} |")

    print()
    print("\n".join(table))
    print()
    for config in args.configs:
        for variant in variants:
            print("\n".join(option_costs(config, {step: results[config, variant, step] for step in args.steps
                                                  if (config, variant, step) in results}, variant)))
    if "paper" not in args.configs or not set(PROJECTED_STEPS) <= set(args.steps):
        print("(no projection: it needs the paper config and the four training kinds of the experiment)")
        return
    paper = PRESETS["paper"]
    train_slices = round(PAPER_SLICES * PAPER_TRAIN_FRACTION)
    print(f"Projected training wall time of `tact reproduce --preset paper` on one {device_name}:")
    print(f"- data: the paper's {PAPER_SLICES} slices, {PAPER_TRAIN_FRACTION:.0%} for training = {train_slices} "
          f"(the split is by patient, so this is approximate), of which validation_fraction "
          f"{paper.training.validation_fraction:g} is held out for validation after every epoch")
    print(f"- epochs: the preset's maxima ({paper.segmentation_epochs} for g, {paper.training.epochs} for each of the 7 "
          "reconstruction trainings), every one run to the end: an upper bound, early stopping only shortens it")
    print("- measured rates only: data loading (overlapped by the loader's workers), checkpoints, simulation, BM3D "
          "and testing are not counted")
    print(f"- the paper's 23 h 38 min covers training and testing on {PAPER_DEVICES} x A100 80 GB running "
          f"{PAPER_DEVICES} trainings at once; it names neither epochs nor batch size, so the epochs above are ours")
    for variant in variants:
        rows = {step: results["paper", variant, step] for step in PROJECTED_STEPS}
        failed = [step for step, r in rows.items() if "error" in r]
        if failed:
            print(f"\n({variant}: no projection, {', '.join(failed)} failed)")
            continue
        if device == "cpu":
            note = "the engine's only mode on CPU"
        elif CUDA_VARIANTS[variant] == (paper.training.amp, paper.training.channels_last):
            note = "the preset's precision and layout"
        else:
            note = "not the preset's precision and layout"
        batch = rows["base"]["batch"]
        if batch != paper.training.batch_size:
            note += f"; the preset's batch is {paper.training.batch_size}, the projection assumes the same slices/s"
        label = f"{rows['base']['precision']}, {rows['base']['layout']}, batch {batch} ({note})"
        print()
        print("\n".join(projection(rows, label)))


if __name__ == "__main__":
    main()
