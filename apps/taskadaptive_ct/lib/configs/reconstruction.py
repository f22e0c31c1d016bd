"""The reconstruction network f: ``reconstruction`` and ``reconstruct_segment`` infer tasks and the ``reconstruction`` train task."""

from __future__ import annotations

from lib.configs.base import AppContext
from lib.trainers import EngineTrainTask
from lib.infers import ReconstructSegment, Reconstruction


class ReconstructionConfig:
    name = "reconstruction"

    def __init__(self, context: AppContext) -> None:
        self.context = context

    def infer(self) -> dict:
        options = self.context.infer_options()
        return {"reconstruction": Reconstruction(self.context.models, **options),
                "reconstruct_segment": ReconstructSegment(self.context.models, **options)}

    def trainer(self) -> dict:
        context = self.context
        return {"reconstruction": EngineTrainTask("reconstruction", context.models, context.studies, context.runs, context.preset)}
