"""``tact serve``: the embedded demo studies and the MONAI Label server command.

The demo studies are new patients for the demo models: three synthetic phantoms drawn
with another seed than any ``tact reproduce`` run's, and the real 20-slice sample (case
``SAMPLE_CASE``, a test patient), simulated at the imaging settings the models' segmenter
records (slice size, angles, N0, domain). They are written once into ``DATA/dataset`` as a
``tact simulate`` data set, whose ``lowdose/`` folder is the app's datastore; a second
``tact serve`` reuses them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from training.checkpoints import read_model
from training.dataset import SimulatedDataset
from training.errors import DataError

log = logging.getLogger(__name__)

DEMO_PHANTOMS = 3
PHANTOM_SLICES = 24
PHANTOM_SEED = 1000
"""Seed of the demo phantoms: ``tact reproduce`` draws its phantoms with seed 0."""
SAMPLE_CASE = "3"
"""The real sample's case (and datastore image) id among the demo studies."""


def demo_imaging(models: str | Path) -> dict[str, Any]:
    """The imaging settings the model folder's segmenter was trained on.

    Raises:
        DataError: no ``segmentation.pt``, or one that does not record its settings.
    """
    path = Path(models) / "segmentation.pt"
    if not path.is_file():
        raise DataError(Path(models), "holds no segmentation.pt; export models with `tact export-models RUN`")
    imaging = read_model(path).imaging
    if imaging is None:
        raise DataError(path, "does not record the imaging settings it was trained on (a version 1 model file); "
                              "give --studies to serve your own data")
    return imaging


def prepare_studies(models: str | Path, data: str | Path, progress: bool = True) -> Path:
    """Simulate the demo studies at the models' settings (once); returns the datastore folder."""
    from training.phantom import write_phantom_dataset
    from training.sample_data import load_sample
    from training.simulate import SimulationSettings, simulate_dataset
    from training.volume import write_lits_case

    imaging = demo_imaging(models)
    data = Path(data)
    lits, dataset = data / "lits", data / "dataset"
    marker = lits / ".complete"
    if not marker.is_file():
        write_phantom_dataset(lits, DEMO_PHANTOMS, size=imaging["slice_size"], slices=PHANTOM_SLICES, seed=PHANTOM_SEED,
                              progress=progress)
        write_lits_case(lits, int(SAMPLE_CASE), load_sample())
        marker.write_text("demo studies\n")
    settings = SimulationSettings(photons=imaging["photons"], num_angles=imaging["angles"], size=imaging["slice_size"],
                                  domain=imaging["domain"], test_fraction=0.0, test_cases=(SAMPLE_CASE,))
    simulate_dataset(lits, dataset, settings, progress=progress)
    SimulatedDataset(dataset)  # complete and readable
    return dataset / "lowdose"


def server_command(app: Path, studies: Path | str, models: Path, host: str, port: int,
                   conf: list[list[str]] | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``monailabel start_server`` command line (with this interpreter) and its environment."""
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
               "--host", host, "--port", str(port), "--conf", "models", str(Path(models).resolve())]
    for key, value in conf or []:
        command += ["--conf", key, value]
    environment = dict(os.environ)
    environment.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")  # MLflow's default store fails here
    environment.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")
    return command, environment


def example_image(studies: str | Path) -> str:
    """An image id of a datastore folder, for the example request ``tact serve`` prints."""
    for path in sorted(Path(studies).iterdir()):
        for suffix in (".nii.gz", ".nii", ".nrrd"):
            if path.is_file() and path.name.endswith(suffix):
                return path.name[: -len(suffix)]
    raise DataError(Path(studies), "holds no image (.nii, .nii.gz, .nrrd) to serve")
