"""Train tasks: the project's training engine (``training.engine.train``) run inside MONAI Label."""

from lib.trainers.engine_task import EngineTrainTask, TrainRequestError

__all__ = ["EngineTrainTask", "TrainRequestError"]
