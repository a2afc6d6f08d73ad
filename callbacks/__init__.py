"""Lightning callbacks: hyperparameter schedules, image grids and text, generative metrics, prediction writing,
the post-hoc latent mixture."""

from callbacks.images import ImageLogger, run_dir
from callbacks.latent_mixture import FitLatentMixture
from callbacks.metrics import ClassifierFeatures, GenerativeMetrics, InceptionFeatures
from callbacks.predictions import PredictionWriter
from callbacks.schedule import ParameterSchedule, schedule_value
from callbacks.text import TextLogger

__all__ = [
    "ClassifierFeatures",
    "FitLatentMixture",
    "GenerativeMetrics",
    "ImageLogger",
    "InceptionFeatures",
    "ParameterSchedule",
    "PredictionWriter",
    "TextLogger",
    "run_dir",
    "schedule_value",
]
