"""Active-learning strategies: which image a clinician should review next."""

from lib.activelearning.task_uncertainty import TaskUncertainty

__all__ = ["TaskUncertainty"]
