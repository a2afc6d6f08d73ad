"""Lightning callbacks: hyperparameter schedules, image grids, generative metrics, prediction writing."""

from callbacks.images import ImageLogger, run_dir
from callbacks.metrics import ClassifierFeatures, GenerativeMetrics, InceptionFeatures
from callbacks.predictions import PredictionWriter
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
