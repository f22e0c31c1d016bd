"""The segmentation network g: ``segmentation`` infer task (and its train task)."""

from __future__ import annotations

from lib.configs.base import AppContext
from lib.infers import Segmentation


class SegmentationConfig:
    name = "segmentation"

    def __init__(self, context: AppContext) -> None:
        self.context = context

    def infer(self) -> dict:
        return {"segmentation": Segmentation(self.context.models, **self.context.infer_options())}

    def trainer(self) -> dict:
        return {}
