"""Pure loss and metric functions shared by the model families, one module per idea.

Everything here works on plain tensors or ``torch.distributions`` objects, has no state and no Lightning dependency,
so each function can be unit-tested against a closed form. ``Objective`` is what every family's objective method
returns. Import from here (``from dgm_lightning.objectives import iwae_terms``): the modules are

- ``objective``: ``Objective``;
- ``elbo``: the decoders' likelihoods, the KL, free bits, the ELBO, the IWAE bound (and its log weights drawn in
  chunks), bits per dimension, and the latent diagnostics (active units, mutual information);
- ``importance``: the IWAE, MIWAE and PIWAE training objectives;
- ``total_correlation``: beta-TC-VAE;
- ``mmd``: the MMD and the InfoVAE / WAE-MMD objective;
- ``gan``: the GAN losses and gradient penalties.
"""

from dgm_lightning.objectives.elbo import (
    Likelihood,
    active_units,
    bits_per_dim,
    chunked_log_weights,
    elbo_terms,
    free_bits_kl,
    gaussian_kl,
    iwae_bound,
    mutual_information,
    reconstruction_distribution,
)
from dgm_lightning.objectives.gan import GANLoss, discriminator_loss, generator_loss, gradient_penalty, r1_penalty
from dgm_lightning.objectives.importance import iwae_terms, miwae_terms, piwae_terms
from dgm_lightning.objectives.mmd import Kernel, mmd, mmd_terms
from dgm_lightning.objectives.objective import Objective
from dgm_lightning.objectives.total_correlation import TCEstimator, beta_tc_terms

__all__ = [
    "GANLoss",
    "Kernel",
    "Likelihood",
    "Objective",
    "TCEstimator",
    "active_units",
    "beta_tc_terms",
    "bits_per_dim",
    "chunked_log_weights",
    "discriminator_loss",
    "elbo_terms",
    "free_bits_kl",
    "gaussian_kl",
    "generator_loss",
    "gradient_penalty",
    "iwae_bound",
    "iwae_terms",
    "miwae_terms",
    "mmd",
    "mmd_terms",
    "mutual_information",
    "piwae_terms",
    "r1_penalty",
    "reconstruction_distribution",
]
