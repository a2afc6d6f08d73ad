"""Pure loss and metric functions shared by the model families.

Everything here works on plain tensors or ``torch.distributions`` objects, has no state and no
Lightning dependency, so each function can be unit-tested against a closed form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    Distribution,
    Independent,
    Normal,
    kl_divergence,
)

LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "gaussian", "gaussian_learned")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the valid choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def reconstruction_distribution(likelihood: str, params: Tensor, *, log_scale: Tensor | None = None) -> Distribution:
    """The decoder's distribution p(x|z) over whole images (event dims = all but the batch dim).

    Args:
        likelihood: one of ``LIKELIHOODS``. ``bernoulli`` and ``continuous_bernoulli`` read ``params``
            as logits; the Gaussians read it as the mean.
        params: decoder output, shape (B, C, H, W) or any (B, ...).
        log_scale: log standard deviation for the Gaussians (a scalar or broadcastable tensor).

    References: continuous Bernoulli, Loaiza-Ganem & Cunningham 2019, arXiv:1907.06845;
        learned (calibrated) Gaussian scale, Rybkin et al. 2021, arXiv:2006.13202.
    """
    check_choice("likelihood", likelihood, LIKELIHOODS)
    event_dims = params.dim() - 1
    # validate_args=False throughout: the Bernoullis also score grey levels in [0, 1], as is common, and
    # non-finite parameters are left to the models' divergence policy to report
    if likelihood == "bernoulli":
        base: Distribution = Bernoulli(logits=params, validate_args=False)
    elif likelihood == "continuous_bernoulli":
        base = ContinuousBernoulli(logits=params, validate_args=False)
    else:
        if log_scale is None:
            raise ValueError(f"likelihood {likelihood!r} needs log_scale")
        base = Normal(params, log_scale.exp().expand_as(params), validate_args=False)
    return Independent(base, event_dims)


def gaussian_kl(posterior: Normal, prior: Normal) -> Tensor:
    """KL(q || p) per latent dimension, shape (B, D): summing over D gives the ELBO's KL term."""
    return kl_divergence(posterior, prior)


def free_bits_kl(kl_per_dim: Tensor, free_bits: float) -> Tensor:
    """The KL term to optimise with free bits: sum over dims of max(free_bits, batch-mean KL of that dim).

    A dimension whose KL is below ``free_bits`` nats gets no gradient pushing it further down, which
    counters posterior collapse. With ``free_bits = 0`` this is the plain batch-mean KL.

    References: Kingma et al. 2016, arXiv:1606.04934 (section C.8).
    """
    return kl_per_dim.mean(0).clamp(min=free_bits).sum()


def iwae_bound(log_weights: Tensor) -> Tensor:
    """Importance-weighted estimate of log p(x) from log w_k = log p(x, z_k) - log q(z_k | x).

    Args:
        log_weights: shape (K, B), K samples per example.

    Returns:
        shape (B,): log (1/K sum_k w_k), a lower bound on log p(x) that tightens as K grows.

    References: Burda et al. 2015, arXiv:1509.00519.
    """
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])


def bits_per_dim(nll_nats: Tensor, num_dims: int) -> Tensor:
    """Convert a negative log-likelihood in nats per example to bits per dimension."""
    return nll_nats / (num_dims * math.log(2.0))


def active_units(posterior_means: Tensor, threshold: float = 0.01) -> Tensor:
    """Number of latent dimensions whose posterior mean varies across the data by more than ``threshold``.

    Args:
        posterior_means: shape (N, D), E_q[z | x] for N examples.

    References: Burda et al. 2015, arXiv:1509.00519 (section 5.2).
    """
    if posterior_means.shape[0] < 2:
        raise ValueError("active_units needs the posterior means of at least 2 examples")
    return (posterior_means.var(dim=0) > threshold).sum()
