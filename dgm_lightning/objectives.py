"""Pure loss and metric functions shared by the model families.

Everything here works on plain tensors or ``torch.distributions`` objects, has no state and no
Lightning dependency, so each function can be unit-tested against a closed form. ``Objective`` is what every
family's objective method returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

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
from torch.nn import functional as F

from dgm_lightning.checks import check_choice


@dataclass
class Objective:
    """A family's objective on one batch: what its ``objective`` method returns (a GAN's ``generator_objective`` and
    ``discriminator_objective`` as well), so that steps, tests, benchmarks and callbacks reach any family's loss the
    same way: ``model.objective(batch).loss``.

    Args:
        terms: named scalar terms, logged as ``{stage}/{name}``; ``loss`` is the one minimised.
        batch_size: examples in the batch: the weight of its terms in the epoch's means.
        codes: the batch's codes (B, latent_dim) in the latent-variable models (posterior means), detached; None
            in the other families.
    """

    terms: dict[str, Tensor]
    batch_size: int
    codes: Tensor | None = None

    def __post_init__(self) -> None:
        if "loss" not in self.terms:
            raise ValueError(f"an objective's terms must include 'loss', the one minimised; got {sorted(self.terms)}")

    @property
    def loss(self) -> Tensor:
        """The term that the optimizer minimises."""
        return self.terms["loss"]


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


# -- GANs ----------------------------------------------------------------------------------------

GANLoss = Literal["non_saturating", "minimax", "least_squares", "wasserstein", "hinge"]


def discriminator_loss(kind: str, real_logits: Tensor, fake_logits: Tensor, *, real_target: float = 1.0) -> Tensor:
    """The discriminator's (critic's) loss for raw outputs D(x) on real and generated examples, batch-averaged.

    Args:
        kind: one of ``GANLoss``. ``non_saturating`` and ``minimax`` share the binary cross-entropy loss
            of the discriminator; ``least_squares`` regresses real to 1 and fake to 0; ``wasserstein`` is
            mean D(fake) - mean D(real); ``hinge`` is mean relu(1 - D(real)) + mean relu(1 + D(fake)).
        real_logits: D's raw outputs on real examples, any shape.
        fake_logits: D's raw outputs on generated examples, any shape.
        real_target: target for real examples, below 1 for one-sided label smoothing (cross-entropy and
            least-squares losses only).

    References: Goodfellow et al. 2014, arXiv:1406.2661; least squares, Mao et al. 2016, arXiv:1611.04076;
        Wasserstein, Arjovsky et al. 2017, arXiv:1701.07875; hinge, Lim & Ye 2017, arXiv:1705.02894;
        one-sided label smoothing, Salimans et al. 2016, arXiv:1606.03498.
    """
    check_choice("GAN loss", kind, GANLoss)
    if real_target != 1.0 and kind in ("wasserstein", "hinge"):
        raise ValueError(f"label smoothing applies to the cross-entropy and least-squares losses, not to {kind!r}")
    if kind in ("non_saturating", "minimax"):
        real = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_target))
        return real + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    if kind == "least_squares":
        return 0.5 * ((real_logits - real_target) ** 2).mean() + 0.5 * (fake_logits**2).mean()
    if kind == "wasserstein":
        return fake_logits.mean() - real_logits.mean()
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_loss(kind: str, fake_logits: Tensor) -> Tensor:
    """The generator's loss for the discriminator's raw outputs on generated examples, batch-averaged.

    ``non_saturating``: -log D(G(z)) (softplus(-logit)); ``minimax``: log(1 - D(G(z))) (-softplus(logit));
    ``least_squares``: 0.5 (D(G(z)) - 1)^2; ``wasserstein`` and ``hinge``: -D(G(z)).

    References: see ``discriminator_loss``.
    """
    check_choice("GAN loss", kind, GANLoss)
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    if kind == "minimax":
        return -F.softplus(fake_logits).mean()
    if kind == "least_squares":
        return 0.5 * ((fake_logits - 1) ** 2).mean()
    return -fake_logits.mean()


def _input_gradient_norms(critic: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """||d critic(x_i) / d x_i||_2 per example (B,), with a graph so that the penalty can be trained through."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return grad.flatten(1).norm(dim=1)


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, alpha: Tensor) -> Tensor:
    """WGAN-GP penalty: mean (||grad_x D(x_hat)|| - 1)^2 on x_hat = alpha * real + (1 - alpha) * fake.

    Args:
        critic: x -> D(x), raw outputs with one value per example.
        real, fake: batches of the same shape (B, ...).
        alpha: interpolation weights in [0, 1], shape (B,), drawn by the caller (uniform in the paper).

    References: Gulrajani et al. 2017, arXiv:1704.00028.
    """
    alpha = alpha.view(-1, *([1] * (real.dim() - 1))).to(real.dtype)
    x_hat = alpha * real.detach() + (1 - alpha) * fake.detach()
    return ((_input_gradient_norms(critic, x_hat) - 1) ** 2).mean()


def r1_penalty(critic: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """R1 penalty: mean ||grad_x D(x)||^2 on real examples (the model weights it by gamma / 2).

    References: Mescheder et al. 2018, arXiv:1801.04406; lazy regularization, Karras et al. 2019, arXiv:1912.04958.
    """
    return (_input_gradient_norms(critic, real) ** 2).mean()


# -- posterior collapse diagnostics --------------------------------------------------------------


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
