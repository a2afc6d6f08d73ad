"""The likelihoods of the decoders, the ELBO and its parts, the importance-weighted bound, and the latent diagnostics
(active units, mutual information)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.distributions import Bernoulli, ContinuousBernoulli, Distribution, Independent, Normal, kl_divergence

from dgm_lightning.checks import check_choice

Likelihood = Literal["bernoulli", "continuous_bernoulli", "gaussian", "gaussian_learned"]


def reconstruction_distribution(likelihood: str, params: Tensor, *, log_scale: Tensor | None = None) -> Distribution:
    """The decoder's distribution p(x|z) over whole images (event dims = all but the batch dim).

    Args:
        likelihood: one of ``Likelihood``. ``bernoulli`` and ``continuous_bernoulli`` read ``params``
            as logits; the Gaussians read it as the mean.
        params: decoder output, shape (B, C, H, W) or any (B, ...).
        log_scale: log standard deviation for the Gaussians (a scalar or broadcastable tensor).

    References: continuous Bernoulli, Loaiza-Ganem & Cunningham 2019, arXiv:1907.06845;
        learned (calibrated) Gaussian scale, Rybkin et al. 2021, arXiv:2006.13202.
    """
    check_choice("likelihood", likelihood, Likelihood)
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


def elbo_terms(reconstruction: Tensor, kl: Tensor, *, beta: float = 1.0, free_bits: float = 0.0) -> dict[str, Tensor]:
    """The named scalar terms of a VAE's objective on a batch; ``loss`` is the one minimised.

    Args:
        reconstruction: log p(x | z) per example, shape (B,).
        kl: KL(q(z|x) || p(z)) per example and latent dimension (B, D), or per example (B,) when it is a
            Monte Carlo estimate (flow posteriors); free bits need the per-dimension form.
        beta: weight of the KL term in the loss.
        free_bits: nats per latent dimension below which the KL is not penalised (see ``free_bits_kl``).
    """
    if kl.dim() == 1 and free_bits > 0:
        raise ValueError("free bits need the KL per latent dimension, shape (B, D)")
    kl_per_example = kl.sum(1) if kl.dim() == 2 else kl
    penalty = free_bits_kl(kl, free_bits) if kl.dim() == 2 else kl.mean()
    return {
        "loss": -reconstruction.mean() + beta * penalty,
        "elbo": (reconstruction - kl_per_example).mean(),
        "reconstruction": reconstruction.mean(),
        "kl": kl_per_example.mean(),
    }


def iwae_bound(log_weights: Tensor) -> Tensor:
    """Importance-weighted estimate of log p(x) from log w_k = log p(x, z_k) - log q(z_k | x).

    Args:
        log_weights: shape (K, B), K samples per example.

    Returns:
        shape (B,): log (1/K sum_k w_k), a lower bound on log p(x) that tightens as K grows.

    References: Burda et al. 2015, arXiv:1509.00519.
    """
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])


def chunked_log_weights(
    log_weights: Callable[[int], tuple[Tensor, Tensor, Tensor]], num_samples: int, chunk_size: int
) -> Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), shape (num_samples, B), from ``log_weights(k)``, which
    draws k samples per example and returns their three terms, each (k, B), called for ``chunk_size`` samples at a
    time: evaluating ``iwae_bound`` on the result decodes at most B * chunk_size inputs at once (no_grad), however
    many samples it takes. A loop of our own: the chunks must be drawn and decoded one after another to free
    each chunk's activations before the next."""
    chunks = []
    for start in range(0, num_samples, chunk_size):
        log_px, log_pz, log_q = log_weights(min(chunk_size, num_samples - start))
        chunks.append(log_px + log_pz - log_q)
    return torch.cat(chunks)


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


def mutual_information(posterior: Normal) -> Tensor:
    """Estimate of I(x; z) under q(x, z) = p_data(x) q(z|x) on a batch of N diagonal Gaussian posteriors.

    I = E_x E_q(z|x)[log q(z|x)] - E_q(z)[log q(z)], with the aggregate posterior q(z) approximated by the
    batch's mixture (1/N) sum_j q(z | x_j) and one z drawn per example. The estimate lies in [0, log N] up
    to sampling noise: 0 when q(z|x) ignores x, log N when the posteriors do not overlap.

    Args:
        posterior: q(z | x) with batch shape (N, D), N >= 2.

    References: Hoffman & Johnson 2016 (ELBO surgery, NeurIPS AABI workshop);
        He et al. 2019, arXiv:1901.05534 (section 4.2).
    """
    loc, scale = posterior.loc, posterior.scale
    if loc.dim() != 2 or loc.shape[0] < 2:
        raise ValueError(
            f"mutual_information needs posteriors of batch shape (N, D) with N >= 2, got {tuple(loc.shape)}"
        )
    n = loc.shape[0]
    # E_q(z|x)[log q(z|x)] is the negative entropy of a diagonal Gaussian, known in closed form
    neg_entropy = -posterior.entropy().sum(-1).mean()
    z = posterior.sample()  # (N, D), one draw per example
    # [i, j] = log q(z_i | x_j)
    log_density = Normal(loc[None], scale[None], validate_args=False).log_prob(z[:, None]).sum(-1)
    log_aggregate = torch.logsumexp(log_density, dim=1) - math.log(n)
    return neg_entropy - log_aggregate.mean()
