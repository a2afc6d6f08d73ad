"""The latent geometries of the VAEs: the posterior family an encoder's output parametrises, its own prior, and the
map from standard normal noise to that prior's samples. ``VAE`` and ``RecurrentVAE`` take them by name
(``posterior``), so both offer the same geometries in the same way.

``gaussian``: a diagonal Gaussian, the encoder giving the mean and log-variance (2 * latent_dim numbers), with the
standard normal prior. ``power_spherical`` and ``von_mises_fisher``: codes on the unit sphere S^(latent_dim - 1),
the encoder giving the mean direction and the concentration (latent_dim + 1 numbers), with the uniform prior on
the sphere. ``latent_dim`` is the ambient dimension: 2 is the circle.

References: Davidson et al. 2018, arXiv:1804.00891; De Cao & Aziz 2020, arXiv:2006.04437.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal
from torch.nn import functional as F

from dgm_lightning.checks import check_choice
from dgm_lightning.distributions import HypersphericalUniform, PowerSpherical, SphericalDistribution, VonMisesFisher

Posterior = Literal["gaussian", "power_spherical", "von_mises_fisher"]
SPHERICAL_POSTERIORS = {"power_spherical": PowerSpherical, "von_mises_fisher": VonMisesFisher}


def check_posterior(posterior: str, latent_dim: int) -> None:
    """Refuse an unknown posterior, and a hyperspherical one on a sphere of dimension 0 (latent_dim 1)."""
    check_choice("posterior", posterior, Posterior)
    if posterior != "gaussian" and latent_dim < 2:
        raise ValueError(
            f"a {posterior} posterior lives on the unit sphere in latent_dim dimensions, at least 2 (the circle); "
            f"got latent_dim={latent_dim}"
        )


def posterior_out_dim(posterior: str, latent_dim: int) -> int:
    """Numbers per example that the encoder outputs for the posterior: 2 * latent_dim (mean and log-variance) for
    the Gaussian, latent_dim + 1 (direction and concentration) for the hyperspherical ones."""
    return 2 * latent_dim if posterior == "gaussian" else latent_dim + 1


def posterior_distribution(posterior: str, out: Tensor) -> Distribution:
    """q(z | x) from the encoder's output (B, posterior_out_dim): a Normal with batch shape (B, latent_dim), or a
    hyperspherical distribution with batch shape (B,) and event shape (latent_dim,)."""
    if posterior == "gaussian":
        loc, log_var = out.chunk(2, dim=1)
        # validate_args=False: non-finite values are the divergence policy's to report, not a crash here
        return Normal(loc, (0.5 * log_var).exp(), validate_args=False)
    out = out.float()  # the sphere's normalisers and samplers need float32 under bf16 autocast
    direction, concentration = out[:, :-1], out[:, -1]
    # softplus + 1: a concentration near 0 (the uniform) would let the posterior collapse at initialisation
    scale = F.softplus(concentration) + 1.0
    return SPHERICAL_POSTERIORS[posterior](F.normalize(direction, dim=-1), scale, validate_args=False)


def posterior_code(q: Distribution) -> Tensor:
    """The code of an example (B, latent_dim): the posterior mean, or on the sphere the mean direction (where the
    decoder is trained; the mean itself lies inside the ball)."""
    return q.mean if isinstance(q, Normal) else q.loc


def own_prior(posterior: str, loc: Tensor, scale: Tensor) -> Distribution:
    """The posterior's own prior: N(loc, scale^2) per dimension for the Gaussian (batch shape (latent_dim,)), the
    uniform distribution on the sphere of loc's size for the hyperspherical ones (event shape (latent_dim,))."""
    if posterior == "gaussian":
        return Normal(loc, scale, validate_args=False)
    return HypersphericalUniform(loc.shape[0], dtype=loc.dtype, device=loc.device)


def latent_log_prob(distribution: Distribution, z: Tensor) -> Tensor:
    """log density of codes z (..., B, latent_dim) under a prior or posterior, summed over dimensions: (..., B)."""
    log_prob = distribution.log_prob(z)
    return log_prob.sum(-1) if isinstance(distribution, Normal) else log_prob


def sphere_from_noise(noise: Tensor) -> Tensor:
    """Points of the uniform distribution on the sphere from standard normal noise (B, d): the noise's direction,
    and e1 for zero noise (temperature 0: the uniform has no mode)."""
    norm = noise.norm(dim=-1, keepdim=True)
    e1 = F.one_hot(torch.zeros_like(norm[:, 0], dtype=torch.long), noise.shape[-1]).to(noise)
    return torch.where(norm > 0, noise / norm.clamp_min(torch.finfo(noise.dtype).tiny), e1)


def detached(distribution: Distribution) -> Distribution:
    """The same distribution with its parameters detached: its log density still passes gradients to the values it
    is evaluated at, but not to the networks that made it (PIWAE holds one set of networks fixed per term).

    Written by hand because torch.distributions has no detach: covers the posteriors and priors of this package
    (Normal, Independent, Categorical, MixtureSameFamily, the hyperspherical distributions).
    """
    if isinstance(distribution, Normal):
        return Normal(distribution.loc.detach(), distribution.scale.detach(), validate_args=False)
    if isinstance(distribution, Independent):
        base = detached(distribution.base_dist)
        return Independent(base, distribution.reinterpreted_batch_ndims, validate_args=False)
    if isinstance(distribution, Categorical):
        return Categorical(logits=distribution.logits.detach(), validate_args=False)
    if isinstance(distribution, MixtureSameFamily):
        mixture, components = distribution.mixture_distribution, distribution.component_distribution
        return MixtureSameFamily(detached(mixture), detached(components), validate_args=False)
    if isinstance(distribution, SphericalDistribution):
        return type(distribution)(distribution.loc.detach(), distribution.scale.detach(), validate_args=False)
    if isinstance(distribution, HypersphericalUniform):
        return distribution  # no parameters
    raise TypeError(f"detached does not know {type(distribution).__name__}: add it to dgm_lightning.posteriors")
