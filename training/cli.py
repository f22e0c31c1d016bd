"""The ``tact`` command line: data, simulation, baselines, training, evaluation and the whole experiment.

Every sub-command validates its arguments (options, output folder, memory, input data)
before doing any work, and reports bad input as one line,
``tact: error: <file or option>: <problem>``, with exit status 2 and nothing written.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from training.errors import DataError, OptionError
from training.methods import PSNR_TOLERANCE_DB, default_variant, without_variant
from training.physics import DEFAULT_HANN_SCALING, PHOTONS_PER_BIN

log = logging.getLogger("training")

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "taskadaptive_ct"
"""The MONAI Label app of this repository."""
class _Parser(argparse.ArgumentParser):
    """argparse with the package's error format and a ``-q`` accepted at every level.

    Errors (a bad choice or type, a missing or unknown option) come out as the one line
    ``tact: error: <option>: <problem>; see `<command> --help``` with exit status 2, not as
    argparse's usage block. Sub-command parsers are of this class too (argparse creates them
    with their parent's class); their ``-q`` defaults to unset so that a ``-q`` given before
    the sub-command is not overridden by the sub-command's default.
    """

    def __init__(self, *args, quiet_default: object = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("-q", "--quiet", action="store_true", default=quiet_default,
                          help="no progress bars, warnings only")

    def error(self, message: str) -> NoReturn:
        self.exit(2, _error_line(_option_first(message), f"see `{self.prog} --help`"))


_REQUIRED = "the following arguments are required: "
_UNRECOGNIZED = "unrecognized arguments: "
_AMBIGUOUS = re.compile(r"^ambiguous option: (\S+) could match (.+)$")


def _option_first(message: str) -> str:
    """argparse's error text rewritten to name the option first: ``--size: invalid ...``."""
    if message.startswith("argument "):
        return message[len("argument "):]
    if message.startswith(_REQUIRED):
        return f"{message[len(_REQUIRED):]}: required, but not given"
    if message.startswith(_UNRECOGNIZED):
        return f"{message[len(_UNRECOGNIZED):]}: unrecognized argument(s)"
    ambiguous = _AMBIGUOUS.match(message)
    if ambiguous:
        return f"{ambiguous[1]}: ambiguous option, could match {ambiguous[2]}"
    return message


def _error_line(message: str, hint: str = "") -> str:
    """The one line a refusal prints: ``tact: error: <file or option>: <problem>[; hint]``."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    return f"tact: error: {text}{'; ' + hint if hint else ''}\n"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    """Seeds and counts: numpy's seed sequences refuse negative seeds."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _float(text: str, problem: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{problem}, got {text}") from None


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] or 'auto', got {text!r}") from None


def _alpha_grid(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None
    if not all(0.0 < value <= 1.0 for value in values):
        raise argparse.ArgumentTypeError(f"alphas must be in (0, 1], got {text!r}")
    return values


def _positive_finite(text: str) -> float:
    """Photon counts, noise levels: ``inf`` and ``nan`` parse as floats but would poison the data."""
    problem = "must be a positive finite number"
    value = _float(text, problem)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{problem}, got {text}")
    return value


def _unit_interval(text: str) -> float:
    """A Hann frequency scaling: in (0, 1]."""
    problem = "must be in (0, 1]"
    value = _float(text, problem)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{problem}, got {text}")
    return value


def _fraction(text: str) -> float:
    """A test fraction: in [0, 1), since the training split must keep a patient."""
    problem = "must be in [0, 1)"
    value = _float(text, problem)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{problem}, got {text}")
    return value


def _studies(text: str) -> Path | str:
    """A datastore folder, or a DICOMweb URL kept as it is."""
    return text.rstrip("/") if text.startswith(("http://", "https://")) else Path(text)


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise argparse.ArgumentTypeError("give at least one method, e.g. lowdose,fbp,bm3d,fulldose")
    return methods


def _add_simulation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--photons", type=_positive_finite, default=PHOTONS_PER_BIN, help="N0, photons per detector bin (default: %(default)g, LoDoPaB)")
    parser.add_argument("--angles", type=_positive_int, default=1000, help="projection angles over [0, pi) (default: %(default)s)")
    parser.add_argument("--size", type=_positive_int, default=512, help="slice size in pixels (default: %(default)s)")
    parser.add_argument("--domain", choices=("physical", "lodopab"), default="physical",
                        help="reconstruction domain from the pixel spacing, or LoDoPaB's fixed 26 cm (default: %(default)s)")
    parser.add_argument("--workers", type=_positive_int, default=None, help="processes (default: every core)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the noise and the split (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tact", description="Task-adaptive low-dose CT reconstruction", quiet_default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("phantom", help="write a synthetic LiTS-like abdominal phantom")
    p.add_argument("--out", required=True, type=Path, help="output folder (LiTS layout)")
    p.add_argument("--volumes", required=True, type=_positive_int, help="number of volumes")
    p.add_argument("--size", type=_positive_int, default=512, help="in-plane size in pixels (default: %(default)s)")
    p.add_argument("--slices", type=_positive_int, default=32, help="slices per volume (default: %(default)s)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: %(default)s)")

    p = commands.add_parser("sample-data", help="build the real abdominal CTs (the 20-slice sample and a second patient) in LiTS layout")
    p.add_argument("--out", required=True, type=Path, help="output folder (LiTS layout)")
    p.add_argument("--cache", type=Path, default=None, help="download cache (default: $TACT_CACHE or ~/.cache/taskadaptivect)")

    p = commands.add_parser("simulate", help="simulate low-dose scans from LiTS-format CT")
    p.add_argument("--lits", required=True, type=Path, help="folder of volume-K / segmentation-K NIfTI pairs")
    p.add_argument("--out", required=True, type=Path, help="data set folder (resumed if unfinished)")
    _add_simulation_options(p)
    p.add_argument("--fbp-scaling", type=_unit_interval, default=DEFAULT_HANN_SCALING, help="Hann frequency scaling of the FBP written with the data (default: %(default)s)")
    p.add_argument("--keep-empty", action="store_true", help="keep slices with an empty segmentation")
    p.add_argument("--test-fraction", type=_fraction, default=0.2, help="fraction of patients in the test split (default: %(default)s)")
    p.add_argument("--impl", choices=("astra_cpu", "astra_cuda"), default=None, help="projector (default: astra_cuda if a GPU is present)")

    p = commands.add_parser("baseline", help="run a classical baseline on a simulated data set")
    baselines = p.add_subparsers(dest="baseline", required=True, metavar="METHOD")
    fbp = baselines.add_parser("fbp", help="Hann FBP, frequency scaling tuned on the training split")
    fbp.add_argument("--frequency-scaling", type=_unit_interval, default=None, help="use this scaling in (0, 1] instead of tuning")
    fbp.add_argument("--tune-slices", type=_positive_int, default=16, help="training slices to tune on (default: %(default)s)")
    bm3d = baselines.add_parser("bm3d", help="BM3D denoising of the low-dose scans")
    bm3d.add_argument("--sigma-psd", type=_positive_finite, default=0.075, help="noise std in normalised units (default: %(default)s, the paper's)")
    bm3d.add_argument("--sweep", action="store_true", help="pick sigma_psd on a random subset of training slices, as the paper did")
    bm3d.add_argument("--sweep-slices", type=_positive_int, default=8, help="training slices for the sweep (default: %(default)s)")
    for sub in (fbp, bm3d):
        sub.add_argument("--dataset", required=True, type=Path, help="data set folder from `tact simulate`")
        sub.add_argument("--workers", type=_positive_int, default=None, help="processes (default: every core)")

    p = commands.add_parser("evaluate", help="PSNR/SSIM per slice, Table I and figures; with --segmenter Table II, "
                                             "Fig. 4 and statistics.md (intervals, paired tests)")
    p.add_argument("--dataset", required=True, type=Path, help="data set folder from `tact simulate`")
    p.add_argument("--methods", type=_methods, default=None,
                   help="comma-separated (default: every method the data set has: lowdose, fbp, bm3d, trained "
                        "reconstructors, fulldose)")
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument("--split", choices=("test", "train", "all"), default="test", help="slices to evaluate (default: %(default)s)")
    p.add_argument("--figures", type=_non_negative_int, default=2, help="number of example slices to draw (default: %(default)s)")
    p.add_argument("--workers", type=_positive_int, default=None, help="processes (default: every core)")
    p.add_argument("--segmenter", type=Path, default=None,
                   help="best.pt of `tact train segmentation`: adds Dice columns, table_dice.md (Table II) and Fig. 4")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="for the segmenter (default: cuda where available)")

    p = commands.add_parser("reconstruct", help="apply a trained reconstruction U-Net to every slice of a data set")
    p.add_argument("--dataset", required=True, type=Path, help="data set folder from `tact simulate`")
    p.add_argument("--checkpoint", required=True, type=Path, help="best.pt of `tact train reconstruction` or `tact train joint`")
    p.add_argument("--method", default=None, help="name in the data set and the report (default: baseunet, ta<alpha> or joint<C>)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="slices per forward pass (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda where available")

    p = commands.add_parser("train", help="train the segmentation network, a reconstruction U-Net or the joint baseline")
    trainings = p.add_subparsers(dest="task", required=True, metavar="TASK")
    seg = trainings.add_parser("segmentation", help="pre-train the segmentation U-Net g on full-dose slices")
    rec = trainings.add_parser("reconstruction", help="the reconstruction U-Net f with a frozen pre-trained g (alpha = 0: Base U-Net)")
    rec.add_argument("--alpha", type=_alpha, default=None,
                     help="task weight alpha in [0, 1] (default: the config's, 0), or 'auto': chosen on validation "
                          "patients by successive halving over --alpha-grid (see training/alpha_search.py)")
    rec.add_argument("--alpha-grid", type=_alpha_grid, default=None, metavar="A,B,...",
                     help="the alphas --alpha auto tries (default: 0.01,0.03,0.1,0.3,0.9)")
    rec.add_argument("--baseline", type=Path, default=None, metavar="BASE/best.pt",
                     help="--alpha auto: the Base U-Net whose validation PSNR the rule compares with (default: "
                          "the search trains one)")
    rec.add_argument("--psnr-tolerance", type=float, default=None, metavar="DB",
                     help="--alpha auto: how far below the Base U-Net's validation PSNR a chosen alpha may fall "
                          "(default: 2 dB)")
    joint = trainings.add_parser("joint", help="joint training of f and g (Adler et al.) with weight C")
    joint.add_argument("--c", type=float, default=None, help="task weight C in [0, 1]")
    for sub in (rec, joint):
        sub.add_argument("--segmenter", type=Path, default=None,
                         help="best.pt of `tact train segmentation` (required for alpha > 0; for joint: g's starting point)")
        sub.add_argument("--init", type=Path, default=None,
                         help="warm start: the best.pt of a reconstruction run (e.g. the Base U-Net's) whose f this "
                              "run starts from")
        sub.add_argument("--normalise-with", type=Path, default=None, metavar="MODEL",
                         help="the normalised loss: divide each term by its value for this reconstruction model file "
                              "(e.g. the Base U-Net's best.pt) on the validation slices, so that alpha is the Dice "
                              "term's share (config key loss_reference; default: the paper's plain loss)")
    for sub in (seg, rec, joint):
        sub.add_argument("--dataset", required=True, type=Path, help="data set folder from `tact simulate`")
        sub.add_argument("--out", required=True, type=Path, help="run folder (an unfinished run there is resumed)")
        sub.add_argument("--config", type=Path, default=None, help="YAML training configuration (see training/config.py)")
        sub.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda where available")
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="configuration overrides, e.g. epochs=20 network.features=16 batch_size=4")

    p = commands.add_parser("reproduce", help="the paper's whole experiment: data -> simulation -> baselines -> all trainings -> report")
    p.add_argument("--preset", choices=("smoke", "cpu", "cpu-seeds", "demo-models", "paper"), default="cpu",
                   help="smoke: CI-sized; cpu: 128 px, narrow U-Nets, under an hour on 2 cores; cpu-seeds: the cpu preset's "
                        "data and g with 3 seeds of the Base U-Net, alpha = 0.1 under a strong and a weak g and the "
                        "balanced setting; demo-models: the cpu preset with the Base U-Net and small alphas, for "
                        "`tact export-models`; paper: the paper's settings, for GPUs (default: %(default)s)")
    p.add_argument("--lits", type=Path, default=None, help="LiTS-format folder (default: synthetic phantoms plus the real sample)")
    p.add_argument("--out", required=True, type=Path, help="run folder; finished stages are skipped when re-run")
    p.add_argument("--workers", type=_positive_int, default=None, help="processes for simulation, baselines, evaluation (default: every core)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="training device (default: cuda where available)")
    p.add_argument("--domain", choices=("physical", "lodopab"), default=None,
                   help="reconstruction domain (default: the preset's: physical for smoke and cpu, lodopab for paper)")
    p.add_argument("--photons", type=_positive_finite, default=None, help="N0, photons per detector bin (default: the preset's)")
    p.add_argument("--angles", type=_positive_int, default=None, help="projection angles over [0, pi) (default: the preset's)")
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help="train every method with this many seeds (seed k in RUN/seeds/k; statistics over all of them in "
                        "report/statistics.md; default: the preset's, 1 except for cpu-seeds)")

    p = commands.add_parser("export-models", help="copy models of a `tact reproduce` run into the app's model folder, with a model card")
    p.add_argument("run", type=Path, help="the run folder of `tact reproduce`")
    p.add_argument("--out", type=Path, default=APP_DIR / "model", help="model folder (default: %(default)s)")
    p.add_argument("--models", type=_methods, default=None,
                   help="comma-separated models of the run, e.g. segmentation,baseunet,ta0.1 (default: every model "
                        "the run trained)")
    p.add_argument("--default", default=None,
                   help="the variant served when a request names none (default: the task-adaptive model with the best "
                        f"validation Dice among those within {PSNR_TOLERANCE_DB:g} dB of the best validation PSNR)")
    p.add_argument("--data", type=Path, default=Path("runs/serve"),
                   help="the demo studies of `tact serve`, on whose real sample the card's served numbers are measured "
                        "(prepared if missing; default: %(default)s)")

    p = commands.add_parser("serve", help="the main job: start the MONAI Label app on embedded studies and the demo models")
    p.add_argument("--models", type=Path, default=APP_DIR / "model", help="model folder (default: %(default)s)")
    p.add_argument("--studies", type=_studies, default=None,
                   help="datastore folder, e.g. DATASET/lowdose, or a PACS's DICOMweb root, e.g. "
                        "http://127.0.0.1:8042/dicom-web (default: embedded studies prepared in --data)")
    p.add_argument("--data", type=Path, default=Path("runs/serve"),
                   help="where the embedded studies are simulated, once (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=_positive_int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--prepare-only", action="store_true", help="prepare the studies and exit without starting the server")
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="more app settings, e.g. --conf retrain_after 5 (see apps/taskadaptive_ct/main.py)")

    p = commands.add_parser("export-dicom", help="write a data set's low-dose (and full-dose) volumes as DICOM CT series, "
                                                 "optionally storing them on a PACS (STOW-RS)")
    p.add_argument("dataset", type=Path, help="a `tact simulate` data set")
    p.add_argument("--out", type=Path, required=True, help="output folder: OUT/<case>/<lowdose|fulldose>/0001.dcm ...")
    p.add_argument("--methods", type=_methods, default=["lowdose", "fulldose"],
                   help="series to write per case (default: lowdose,fulldose; one study per case)")
    p.add_argument("--cases", type=_methods, default=None, help="comma-separated case ids (default: all)")
    p.add_argument("--stow", default=None, metavar="URL",
                   help="also store the series on this DICOMweb server, e.g. http://127.0.0.1:8042/dicom-web "
                        "(credentials from MONAI_LABEL_DICOMWEB_USERNAME / _PASSWORD)")

    p = commands.add_parser("orthanc", help="run a private Orthanc PACS on 127.0.0.1 (DICOMweb) until interrupted")
    p.add_argument("--dir", type=Path, default=Path("runs/orthanc"),
                   help="its configuration, storage and log (kept between runs; default: %(default)s)")
    p.add_argument("--port", type=_positive_int, default=8042, help="HTTP/DICOMweb port (default: %(default)s)")
    p.add_argument("--dicom-port", type=_positive_int, default=None, help="also listen for DICOM (C-STORE) on this port")

    p = commands.add_parser("demo", help="the classical pipeline on the real sample: low dose -> FBP, BM3D -> report")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: %(default)s)")
    _add_simulation_options(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may stand anywhere after `tact train TASK`, between options too.
    if args.command == "train" and all("=" in token and not token.startswith("-") for token in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.exit(2, _error_line(_option_first(_UNRECOGNIZED + " ".join(extra)), f"see `{_command_line(args)} --help`"))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ignite").setLevel(logging.WARNING)  # its per-epoch lines repeat ours
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # a line per request, through the progress bars
    progress = not args.quiet
    try:
        return _COMMANDS[args.command](args, progress)
    except (DataError, ValueError, FileNotFoundError) as exc:
        parser.exit(2, _error_line(exc))
    except FloatingPointError as exc:
        parser.exit(1, f"tact: training failed: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, "tact: interrupted; re-run the same command to resume\n")


def _command_line(args: argparse.Namespace) -> str:
    """``tact simulate``, ``tact baseline fbp``, ``tact train joint``: the sub-command given."""
    words = ["tact", args.command, getattr(args, "baseline", None) or getattr(args, "task", None)]
    return " ".join(w for w in words if w)


def _check_memory(option: str, estimate, advice: str) -> None:
    """Refuse a run whose memory estimate (:mod:`training.resources`) exceeds this machine's memory."""
    from training.resources import GIB, physical_memory

    available = physical_memory()
    if estimate.total > available:
        raise OptionError(option, f"needs about {estimate.total / GIB:,.1f} GiB of memory ({estimate.detail}), but this "
                                  f"machine has {available / GIB:,.1f} GiB; {advice}")


def _phantom(args: argparse.Namespace, progress: bool) -> int:
    from training.fileio import check_output_folder
    from training.phantom import write_phantom_dataset
    from training.resources import phantom_memory

    check_output_folder(args.out)
    _check_memory("--size", phantom_memory(args.size, args.slices),
                  "choose a smaller --size or fewer --slices (volumes are made one at a time)")
    pairs = write_phantom_dataset(args.out, args.volumes, size=args.size, slices=args.slices, seed=args.seed, progress=progress)
    print(f"wrote {len(pairs)} phantom volume(s) to {args.out}")
    return 0


def _sample_data(args: argparse.Namespace, progress: bool) -> int:
    from training.fileio import check_output_folder
    from training.sample_data import REAL_CASES, build_real_data

    check_output_folder(args.out)
    pairs = build_real_data(args.out, cache_dir=args.cache)
    for (volume, _), name in zip(pairs, REAL_CASES):
        print(f"{volume}: {name}")
    print(f"wrote {len(pairs)} real patients to {args.out} (masks: TotalSegmentator's model output)")
    return 0


def _settings(args: argparse.Namespace, **extra):
    from training.simulate import SimulationSettings

    return SimulationSettings(photons=args.photons, num_angles=args.angles, size=args.size, domain=args.domain, seed=args.seed, **extra)


def _check_simulation_memory(args: argparse.Namespace, lits: Path, workers: int | None) -> None:
    """Refuse ``--size`` / ``--angles`` that the simulation of the largest input volume cannot hold in memory."""
    from training.loaders import find_lits_cases
    from training.parallel import default_workers
    from training.resources import largest_volume_shape, simulation_memory

    source = largest_volume_shape([volume for _, volume, _ in find_lits_cases(lits)])
    estimate = simulation_memory(args.size, args.angles, workers or default_workers(), source)
    _check_memory("--size", estimate, "choose a smaller --size, fewer --angles or fewer --workers")


def _simulate(args: argparse.Namespace, progress: bool) -> int:
    from training.fileio import check_output_folder
    from training.simulate import simulate_dataset

    settings = _settings(args, fbp_scaling=args.fbp_scaling, keep_empty=args.keep_empty, test_fraction=args.test_fraction)
    check_output_folder(args.out)
    _check_simulation_memory(args, args.lits, args.workers)
    # simulate_dataset checks every input case before it writes anything.
    dataset = simulate_dataset(args.lits, args.out, settings, workers=args.workers, impl=args.impl, progress=progress)
    split = dataset.manifest["split"]
    print(f"{args.out}: {len(dataset.slices('train'))} training slices ({len(split['train'])} patients), "
          f"{len(dataset.slices('test'))} test slices ({len(split['test'])} patients)")
    return 0


def _baseline(args: argparse.Namespace, progress: bool) -> int:
    from training.baselines import run_bm3d, run_fbp
    from training.dataset import SimulatedDataset

    dataset = SimulatedDataset(args.dataset)
    if args.baseline == "fbp":
        scaling = run_fbp(dataset, args.frequency_scaling, workers=args.workers, progress=progress, tune_slices=args.tune_slices)
        print(f"FBP (Hann, frequency scaling {scaling:g}) written for {len(dataset.cases)} case(s)")
    else:
        sigma = run_bm3d(dataset, args.sigma_psd, sweep=args.sweep, workers=args.workers, progress=progress, sweep_slices=args.sweep_slices)
        print(f"BM3D (sigma_psd {sigma:g}) written for {len(dataset.cases)} case(s)")
    return 0


def _evaluate(args: argparse.Namespace, progress: bool) -> int:
    from training.dataset import SimulatedDataset
    from training.evaluate import evaluate_dataset
    from training.fileio import check_output_folder
    from training.statistics import write_statistics

    check_output_folder(args.out)
    dataset = SimulatedDataset(args.dataset)
    # Without --methods: what the data set has (the README's walkthrough runs no BM3D).
    methods = args.methods if args.methods is not None else dataset.available_methods()
    evaluate_dataset(dataset, methods, args.out, split=args.split, figures=args.figures,
                     workers=args.workers, progress=progress, segmenter=args.segmenter, device=args.device)
    print((args.out / "table_reconstruction.md").read_text())
    if args.segmenter is not None:
        print((args.out / "table_dice.md").read_text())
        write_statistics([args.out], methods, args.out, title=f"`tact evaluate` of {args.dataset} ({args.split} split)")
    print(f"report: {args.out}" + (f" (intervals and paired tests: {args.out / 'statistics.md'})" if args.segmenter else ""))
    return 0


def _reconstruct(args: argparse.Namespace, progress: bool) -> int:
    from training.dataset import SimulatedDataset
    from training.inference import reconstruct_dataset

    method = reconstruct_dataset(SimulatedDataset(args.dataset), args.checkpoint, method=args.method,
                                 batch_size=args.batch_size, device=args.device, progress=progress)
    print(f"{args.dataset}: wrote method {method!r}; evaluate it with `tact evaluate --methods ...,{method}`")
    return 0


def _train(args: argparse.Namespace, progress: bool) -> int:
    from training.config import load_config
    from training.engine import train
    from training.fileio import check_output_folder

    check_output_folder(args.out)
    overrides = [f"task={args.task}", *args.overrides]
    weight = getattr(args, "alpha", None) if args.task == "reconstruction" else getattr(args, "c", None)
    auto = weight == "auto"
    search_options = [name for name in ("alpha_grid", "baseline", "psnr_tolerance") if getattr(args, name, None) is not None]
    if search_options and not auto:
        option = "--" + search_options[0].replace("_", "-")
        raise OptionError(option, "is an option of --alpha auto; give --alpha auto or leave it out")
    if auto:
        from training.alpha_search import DEFAULT_GRID

        # The search sets each candidate's alpha; a placeholder above 0 lets the configuration carry
        # options of a two-term loss (--normalise-with), which alpha = 0 would refuse.
        weight = max(args.alpha_grid or DEFAULT_GRID)
    if weight is not None:
        overrides.append(f"weight={weight!r}")
    if getattr(args, "segmenter", None) is not None:
        overrides.append(f"segmenter_checkpoint={str(args.segmenter)!r}")
    if getattr(args, "init", None) is not None:
        overrides.append(f"init_checkpoint={str(args.init)!r}")
    if getattr(args, "normalise_with", None) is not None:
        overrides.append(f"loss_reference={str(args.normalise_with)!r}")
    config = load_config(args.config, overrides)
    try:
        if auto:
            return _search_alpha(args, config, progress)
        summary = train(config, args.dataset, args.out, device=args.device, progress=progress)
    finally:
        _leave_process_group()
    print(f"{args.out}: {summary.epochs} epoch(s){' (early stop)' if summary.stopped_early else ''}, best epoch "
          f"{summary.best_epoch} ({summary.selection['metric']} {summary.selection['best_value']:.4g}), {summary.seconds:.0f} s on {summary.world_size} "
          f"process(es); model: {args.out / 'best.pt'}")
    return 0


def _leave_process_group() -> None:
    """Under torchrun: leave the process group before exit; gloo's threads left running at
    interpreter exit can abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _search_alpha(args: argparse.Namespace, config, progress: bool) -> int:
    from training.alpha_search import DEFAULT_GRID, PSNR_TOLERANCE_DB, search_alpha

    tolerance = PSNR_TOLERANCE_DB if args.psnr_tolerance is None else args.psnr_tolerance
    record = search_alpha(config, args.dataset, args.out, grid=args.alpha_grid or DEFAULT_GRID, baseline=args.baseline,
                          tolerance_db=tolerance, device=args.device, progress=progress)
    print((args.out / "alpha_search.md").read_text())
    print(f"{args.out}: alpha = {record['chosen']:g} chosen on validation patients; model: {args.out / 'best.pt'}")
    return 0


def _reproduce(args: argparse.Namespace, progress: bool) -> int:
    from training.fileio import check_output_folder
    from training.presets import PRESETS
    from training.reproduce import Reproduction, format_seconds

    check_output_folder(args.out)
    preset = PRESETS[args.preset].with_simulation(domain=args.domain, photons=args.photons, angles=args.angles)
    reproduction = Reproduction(preset, args.out, lits=args.lits, workers=args.workers, device=args.device,
                                progress=progress, seeds=args.seeds)
    costs = reproduction.run()
    report = args.out / "report"
    for table in ("table_reconstruction.md", "table_dice.md"):
        print((report / table).read_text())
    if reproduction.seeds > 1:
        print((report / "statistics.md").read_text())
    ran = sum(c.seconds for c in costs if c.ran)
    print(f"compute cost: {format_seconds(sum(c.seconds for c in costs))} in all stages "
          f"({format_seconds(ran)} in this invocation); see {report / 'compute_cost.md'}")
    print(f"report: {report} (statistics over {reproduction.seeds} seed(s): {report / 'statistics.md'})")
    return 0


def _demo(args: argparse.Namespace, progress: bool) -> int:
    """Real sample -> simulate -> FBP -> BM3D -> report; each stage skipped when already done."""
    from training.baselines import run_bm3d, run_fbp
    from training.evaluate import evaluate_dataset
    from training.fileio import check_output_folder
    from training.loaders import find_lits_cases
    from training.parallel import default_workers
    from training.resources import SAMPLE_SHAPE, demo_memory
    from training.sample_data import build_sample_data
    from training.simulate import simulate_dataset

    start = time.perf_counter()
    lits, data, report = args.out / "lits", args.out / "dataset", args.out / "report"
    settings = _settings(args)
    check_output_folder(args.out)
    _check_memory("--size", demo_memory(args.size, args.angles, args.workers or default_workers(), SAMPLE_SHAPE),
                  "choose a smaller --size, fewer --angles or fewer --workers")
    try:
        find_lits_cases(lits)
    except DataError:
        build_sample_data(lits)
    dataset = simulate_dataset(lits, data, settings, workers=args.workers, progress=progress)
    # `simulate` wrote the FBP with LoDoPaB's scaling; retune it where there is training data.
    if dataset.slices("train") and not dataset.methods.get("fbp", {}).get("tuned_on"):
        run_fbp(dataset, workers=args.workers, progress=progress)
    if not dataset.has_method("bm3d"):
        run_bm3d(dataset, workers=args.workers, progress=progress)
    evaluate_dataset(dataset, out=report, split="test", workers=args.workers, progress=progress)
    print((report / "table_reconstruction.md").read_text())
    print(f"demo finished in {time.perf_counter() - start:.0f} s; report: {report}")
    return 0


def _export_models(args: argparse.Namespace, progress: bool) -> int:
    from training.checkpoints import read_model
    from training.model_card import export_models

    models = args.models or trained_models(args.run)
    variants = [m for m in models if without_variant(m) != m]  # ta0.5-balanced, and a variant's segmentation-<tag>
    if variants:
        raise OptionError("--models", f"{', '.join(variants)}: the app names a model by its task and weight, so a "
                                      "variant would be served under the name of the paper's model; export the "
                                      "paper's models (segmentation, baseunet, ta<alpha>, joint<C>)")
    reconstructors = [m for m in models if m != "segmentation"]
    if not reconstructors or "segmentation" not in models:
        raise OptionError("--models", "give the segmentation model and at least one reconstructor")
    files = {m: args.run / "models" / m / "best.pt" for m in models}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise DataError(args.run, f"no such model file(s): {', '.join(missing)}; run `tact reproduce` to the end first")
    default = args.default
    if default is None:
        default = default_variant({m: read_model(files[m]).metrics for m in reconstructors})
    command = (f"tact export-models {args.run} --out {args.out}" + (f" --models {','.join(args.models)}" if args.models else "")
               + (f" --default {args.default}" if args.default else ""))
    result = export_models(args.run, args.out, models, default, args.data, command=command, progress=progress)
    quality = result["quality"]
    print(f"{args.out}: {', '.join(models)}; default variant {default}")
    print(f"served on the real sample ({quality['case']}): PSNR {quality['psnr_served']:.2f} dB (FBP "
          f"{quality['psnr_fbp']:.2f}), g's liver Dice {quality['liver_dice_served']:.3f} (on the FBP "
          f"{quality['liver_dice_fbp']:.3f}); model card: {args.out / 'MODEL_CARD.md'}")
    return 0


def trained_models(run: Path) -> list[str]:
    """The models a ``tact reproduce`` run has trained (``models/<name>/best.pt``): g first, then the
    reconstructors; the preset's variants (``ta0.5-balanced``, a variant's own ``segmentation-<tag>``)
    are left out, since the app serves a model under its task and weight."""
    names = sorted(path.parent.name for path in (run / "models").glob("*/best.pt")
                   if without_variant(path.parent.name) == path.parent.name)
    if not names:
        raise DataError(run, "holds no trained model (models/<name>/best.pt); run `tact reproduce` first")
    return sorted(names, key=lambda name: (name != "segmentation", name != "baseunet", name))


def _serve(args: argparse.Namespace, progress: bool) -> int:
    import os

    from training.serving import SAMPLE_CASE, example_image, prepare_studies, server_command

    studies = args.studies if args.studies is not None else prepare_studies(args.models, args.data, progress=progress)
    on_pacs = isinstance(studies, str)
    if args.studies is None:
        image = SAMPLE_CASE
    else:
        image = "SERIES_UID" if on_pacs else example_image(studies)
    command, environment = server_command(APP_DIR, studies, args.models, args.host, args.port, args.conf)
    if args.prepare_only:
        print(f"studies ready: {studies}")
        return 0
    url = f"http://{args.host}:{args.port}"
    print(f"TaskAdaptiveCT app: {url}  (API docs: {url}/docs, Swagger: {url}/)")
    print(f"studies: {studies}   models: {args.models}")
    if on_pacs:
        print(f"series of the PACS: curl '{url}/datastore/?output=all'   viewer: {url}/ohif/")
    print(f"reconstruct and segment study {image}{' (the real sample)' if args.studies is None else ''}:")
    print(f"  curl -X POST '{url}/infer/reconstruct_segment?image={image}&output=json' -F 'params={{}}'")
    sys.stdout.flush()
    os.execve(command[0], command, environment)
    return 0  # not reached: the server replaces this process


def _export_dicom(args: argparse.Namespace, progress: bool) -> int:
    from tqdm.auto import tqdm

    from training.dicom_series import export_dataset, read_series
    from training.dicomweb import StowError, dicomweb_client, store_series
    from training.fileio import check_output_folder

    import requests

    check_output_folder(args.out)
    client = None
    if args.stow is not None:
        try:
            client = dicomweb_client(args.stow)
            client.search_for_studies(limit=1)  # does it answer? before any work
        except ValueError as error:
            raise OptionError("--stow", str(error)) from None
        except requests.HTTPError as error:
            raise OptionError("--stow", f"the DICOMweb server refused a query: HTTP {error.response.status_code} "
                                        "(credentials: MONAI_LABEL_DICOMWEB_USERNAME / _PASSWORD)") from None
        except requests.RequestException as error:
            raise OptionError("--stow", _no_answer(error)) from None
    written = export_dataset(args.dataset, args.out, args.methods, args.cases)
    folders = [(case, method, folder) for case, series in written.items() for method, folder in series.items()]
    for case, method, folder in folders:
        print(f"{case} {method}: {folder}")
    if client is None:
        return 0
    for case, method, folder in tqdm(folders, desc="STOW-RS", unit="series", disable=not progress):
        try:
            store_series(client, read_series(folder))
        except requests.ConnectionError as error:
            raise OptionError("--stow", _no_answer(error)) from None
        except StowError as error:
            raise DataError(folder, str(error)) from None
    print(f"stored {len(folders)} series on {args.stow}")
    return 0


def _no_answer(error: Exception) -> str:
    return (f"the DICOMweb server does not answer ({type(error).__name__}); is it running? "
            "(`make orthanc` starts one on 127.0.0.1:8042)")


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def _orthanc(args: argparse.Namespace, progress: bool) -> int:
    import signal

    from training.orthanc import OrthancServer

    server = OrthancServer(args.dir, http_port=args.port, dicom_port=args.dicom_port).start()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops Orthanc as cleanly as Ctrl-C
    print(f"Orthanc: {server.url}  (Orthanc Explorer: {server.url}/app/explorer.html)")
    print(f"DICOMweb: {server.dicomweb_url}   storage: {server.folder / 'storage'}   log: {server.log_path}")
    print(f"serve it: monailabel start_server --app {APP_DIR} --studies {server.dicomweb_url} --host 127.0.0.1")
    print("stop with Ctrl-C")
    sys.stdout.flush()
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        print(f"Orthanc exited:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


_COMMANDS = {
    "phantom": _phantom,
    "sample-data": _sample_data,
    "simulate": _simulate,
    "baseline": _baseline,
    "evaluate": _evaluate,
    "demo": _demo,
    "train": _train,
    "reconstruct": _reconstruct,
    "reproduce": _reproduce,
    "export-models": _export_models,
    "serve": _serve,
    "export-dicom": _export_dicom,
    "orthanc": _orthanc,
}


if __name__ == "__main__":
    sys.exit(main())
