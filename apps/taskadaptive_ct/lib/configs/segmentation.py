"""The segmentation network g: ``segmentation`` infer task and its ``segmentation`` train task."""

from __future__ import annotations

from lib.configs.base import AppContext
from lib.trainers import EngineTrainTask
from lib.infers import Segmentation


class SegmentationConfig:
    name = "segmentation"

    def __init__(self, context: AppContext) -> None:
        self.context = context

    def infer(self) -> dict:
        return {"segmentation": Segmentation(self.context.models, **self.context.infer_options())}

    def trainer(self) -> dict:
        context = self.context
        return {"segmentation": EngineTrainTask("segmentation", context.models, context.studies, context.runs, context.preset)}
