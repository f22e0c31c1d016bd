"""What every config is given: the app's settings and shared objects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lib.models import ModelFolder


@dataclass
class AppContext:
    """The app's model folder, settings (``--conf``) and datastore, as the configs use them.

    Attributes:
        models: the served model folder.
        default_variant: the reconstructor served when a request names none ("" = the best validated one).
        batch_size: default slices per forward pass.
        max_voxels: largest input volume accepted.
        store: keeps a computed volume for a datastore image (``TaskAdaptiveDatastore.store_volume``).
        studies: the datastore folder.
        runs: where training runs are written.
        preset: the ``tact`` preset whose training settings the train tasks start from.
        conf: every ``--conf`` key and value, as given.
    """

    models: ModelFolder
    default_variant: str | None
    batch_size: int
    max_voxels: int
    store: Callable[..., Any]
    studies: Path
    runs: Path
    preset: str
    conf: dict[str, str]

    def infer_options(self) -> dict[str, Any]:
        return {"default_variant": self.default_variant, "batch_size": self.batch_size,
                "max_voxels": self.max_voxels, "store": self.store}
