"""dgm-lightning: deep generative models as PyTorch Lightning modules."""

from dgm_lightning.autoencoder import AE, LatentVariableModel
from dgm_lightning.base import GenerativeModel
from dgm_lightning.classifier import Classifier
from dgm_lightning.vae import VAE

__all__ = ["AE", "Classifier", "GenerativeModel", "LatentVariableModel", "VAE"]
__version__ = "0.1.0"
