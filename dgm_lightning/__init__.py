"""dgm-lightning: deep generative models as PyTorch Lightning modules."""

from dgm_lightning.autoencoder import AE
from dgm_lightning.base import GenerativeModel
from dgm_lightning.classifier import Classifier
from dgm_lightning.code_prior import VQVAEPrior
from dgm_lightning.flow import Flow
from dgm_lightning.flow_vae import FlowVAE
from dgm_lightning.gan import GAN
from dgm_lightning.latent_variable import LatentVariableModel
from dgm_lightning.recurrent_vae import RecurrentVAE
from dgm_lightning.vae import VAE
from dgm_lightning.vocabulary import Vocabulary
from dgm_lightning.vqvae import VQVAE

__all__ = [
    "AE",
    "Classifier",
    "Flow",
    "FlowVAE",
    "GAN",
    "GenerativeModel",
    "LatentVariableModel",
    "RecurrentVAE",
    "VAE",
    "Vocabulary",
    "VQVAE",
    "VQVAEPrior",
]
__version__ = "0.1.0"
