"""Lightning callbacks: hyperparameter schedules, image grids, prediction writing."""

from callbacks.images import ImageLogger, PredictionWriter, run_dir
from callbacks.metrics import ClassifierFeatures, GenerativeMetrics, InceptionFeatures
from callbacks.schedule import ParameterSchedule, schedule_value

__all__ = [
    "ClassifierFeatures",
    "GenerativeMetrics",
    "ImageLogger",
    "InceptionFeatures",
    "ParameterSchedule",
    "PredictionWriter",
    "run_dir",
    "schedule_value",
]
