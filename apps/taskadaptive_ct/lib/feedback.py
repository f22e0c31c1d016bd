"""The clinicians' feedback loop: corrected labels counted towards a retraining.

Every ``final`` label saved through the app (``PUT /datastore/label?tag=final``) is a
correction. A correction of a training-split image of the data set counts; one of a
test-split image is stored but not counted (the test patients stay out of training). When
``retrain_after`` corrections have been counted (``--conf retrain_after N``; 0, the
default, turns retraining off), the app trains the segmenter g on the corrected labels and
then the configured reconstructor with the new g frozen, one after the other (MONAI
Label's train queue), and the count starts again.

The count is kept in ``<studies>/.taskadaptivect-feedback.json`` (written atomically), so
it survives a restart.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from training.fileio import save_json

STATE_FILE = ".taskadaptivect-feedback.json"


class FeedbackLog:
    """Corrections since the last retraining (see the module docstring).

    Args:
        studies: the datastore folder, where the state file lives.
        retrain_after: corrections that trigger a retraining (0: never).
    """

    def __init__(self, studies: str | Path, retrain_after: int = 0) -> None:
        if retrain_after < 0:
            raise ValueError(f"retrain_after must not be negative, got {retrain_after}")
        self.path = Path(studies) / STATE_FILE
        self.retrain_after = retrain_after
        self._lock = threading.Lock()

    def state(self) -> dict[str, Any]:
        if self.path.is_file():
            return json.loads(self.path.read_text())
        return {"pending": [], "corrections": 0, "retrainings": 0, "last_retraining": None}

    def record(self, image_id: str, counted: bool) -> dict[str, Any]:
        """Note a correction; returns the state with ``due``: whether a retraining should start now."""
        with self._lock:
            state = self.state()
            state["corrections"] += 1
            if counted and image_id not in state["pending"]:
                state["pending"].append(image_id)
            due = self.retrain_after > 0 and len(state["pending"]) >= self.retrain_after
            if due:
                state["retrainings"] += 1
                state["last_retraining"] = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "images": state["pending"]}
                state["pending"] = []
            save_json(self.path, state)
        return {**self.status(state), "counted": counted, "due": due}

    def status(self, state: dict[str, Any] | None = None) -> dict[str, Any]:
        state = state or self.state()
        return {"retrain_after": self.retrain_after, "pending": len(state["pending"]),
                "corrections": state["corrections"], "retrainings": state["retrainings"],
                "last_retraining": state["last_retraining"]}
