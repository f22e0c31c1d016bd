"""Joint training of f and g (the paper's comparison, weight C): the ``joint`` train task.

A joint model is served by the reconstruction config like any reconstructor
(``joint0.5``), segmented by its own g in ``reconstruct_segment``.
"""

from __future__ import annotations

from lib.configs.base import AppContext
from lib.trainers import EngineTrainTask


class JointConfig:
    name = "joint"

    def __init__(self, context: AppContext) -> None:
        self.context = context

    def infer(self) -> dict:
        return {}

    def trainer(self) -> dict:
        context = self.context
        return {"joint": EngineTrainTask("joint", context.models, context.studies, context.runs, context.preset)}
