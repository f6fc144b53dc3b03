"""The STAR network (stacked hourglass + AAM), its checkpoints and inference speed paths."""

from .checkpoint import CheckpointError, load_model, save_model
from .hourglass import StackedHourglassNet, StarOutput, build_model

__all__ = [
    "CheckpointError",
    "StackedHourglassNet",
    "StarOutput",
    "build_model",
    "load_model",
    "save_model",
]
