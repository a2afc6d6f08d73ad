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

from dgm_lightning.checks import check_choice, check_positive, check_positive_int


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


# -- VAE objectives beyond the ELBO: importance weighting, total correlation, MMD ----------------


def _importance_log_weights(log_px: Tensor, log_pz: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """(log_px - kl, kl) with kl = log q(z_k|x) - log p(z_k), both (S, B), once the three inputs are (S, B) alike.

    The ELBO is written log_px - kl, the order ``elbo_terms`` uses, so that one sample gives its value bit for bit.
    """
    if log_px.dim() != 2 or log_px.shape != log_pz.shape or log_px.shape != log_q.shape:
        raise ValueError(
            "log_px, log_pz and log_q must share one shape (num_samples, batch), got "
            f"{tuple(log_px.shape)}, {tuple(log_pz.shape)} and {tuple(log_q.shape)}"
        )
    kl = log_q - log_pz
    return log_px - kl, kl


def iwae_terms(log_px: Tensor, log_pz: Tensor, log_q: Tensor, *, beta: float = 1.0) -> dict[str, Tensor]:
    """The IWAE bound as a training objective from K importance samples z_k ~ q(z|x) per example.

    ``beta`` weights the KL part of each log weight: log w_k = log p(x|z_k) - beta (log q(z_k|x) - log p(z_k)),
    so that beta = 1 is the plain IWAE and K = 1 is the beta-ELBO of ``elbo_terms`` (same loss). For beta != 1 the
    loss is no bound on log p(x); ``iwae`` and ``elbo`` are always the plain (beta = 1) values, for comparison.
    Free bits are not offered: they need a per-dimension KL, which the importance weights mix away.

    Args:
        log_px: log p(x | z_k), shape (K, B).
        log_pz: log p(z_k), shape (K, B).
        log_q: log q(z_k | x), shape (K, B); z_k reparameterised, so that the loss has gradients.
        beta: weight of the KL part of the log weights.

    Returns:
        ``loss`` (-batch mean of the beta-weighted bound), ``iwae`` (batch mean of the bound, beta = 1), ``elbo``
        (mean over samples and batch of the single-sample ELBO), ``reconstruction`` (mean log p(x|z_k)) and ``kl``
        (mean log q(z_k|x) - log p(z_k)).

    References: Burda et al. 2015, arXiv:1509.00519.
    """
    elbo, kl = _importance_log_weights(log_px, log_pz, log_q)
    weighted = elbo if beta == 1.0 else log_px - beta * kl
    return {
        "loss": -iwae_bound(weighted).mean(),
        "iwae": iwae_bound(elbo).mean(),
        "elbo": elbo.mean(),
        "reconstruction": log_px.mean(),
        "kl": kl.mean(),
    }


def _grouped_iwae_bound(log_weights: Tensor, num_groups: int) -> Tensor:
    """Mean over ``num_groups`` consecutive blocks of the samples of each block's IWAE bound: (S, B) -> (B,)."""
    num_samples, batch = log_weights.shape
    # (S, B) -> (M, K, B) -> (K, M, B): iwae_bound reduces the first axis, the K samples of each group
    grouped = log_weights.view(num_groups, num_samples // num_groups, batch).transpose(0, 1)
    return iwae_bound(grouped).mean(0)


def miwae_terms(
    log_px: Tensor, log_pz: Tensor, log_q: Tensor, *, num_groups: int, beta: float = 1.0
) -> dict[str, Tensor]:
    """The MIWAE(M, K) objective: the S = M K samples split into M groups of K, the mean of the groups' IWAE bounds.

    Rainforth et al. show that the inference network's gradient grows noisier relative to its size as K grows
    (the IWAE's signal-to-noise ratio falls as 1/sqrt(K)) while the generative network's improves; M groups of K
    trade a looser bound for a better-trained encoder at the same S. M = 1 is the IWAE with S samples, M = S the
    ELBO averaged over S samples. Groups are consecutive blocks of the sample axis (the samples are i.i.d., so any
    split would do). ``beta`` enters each log weight as in ``iwae_terms``.
    PIWAE (the IWAE for the decoder, MIWAE for the encoder) is not offered: it needs different losses for the two
    networks' parameters, i.e. two backward passes or optimizers, which a function of tensors cannot give.

    Args:
        log_px, log_pz, log_q: as in ``iwae_terms``, shape (S, B).
        num_groups: M, which must divide S.
        beta: weight of the KL part of the log weights.

    Returns:
        ``loss`` (-batch mean of the beta-weighted MIWAE bound), ``miwae`` (its batch mean, beta = 1), ``iwae`` (the
        IWAE bound of all S samples, beta = 1, the tightest), ``elbo``, ``reconstruction``, ``kl`` as in
        ``iwae_terms``.

    References: Rainforth et al. 2018, arXiv:1802.04537; Burda et al. 2015, arXiv:1509.00519.
    """
    elbo, kl = _importance_log_weights(log_px, log_pz, log_q)
    check_positive_int(num_groups=num_groups)
    if elbo.shape[0] % num_groups != 0:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of importance samples ({elbo.shape[0]})")
    weighted = elbo if beta == 1.0 else log_px - beta * kl
    return {
        "loss": -_grouped_iwae_bound(weighted, num_groups).mean(),
        "miwae": _grouped_iwae_bound(elbo, num_groups).mean(),
        "iwae": iwae_bound(elbo).mean(),
        "elbo": elbo.mean(),
        "reconstruction": log_px.mean(),
        "kl": kl.mean(),
    }


TCEstimator = Literal["mws", "mss"]


def _aggregate_log_weights(batch: int, dataset_size: int, estimator: str, like: Tensor) -> Tensor:
    """log r_ij (B, B): the weight of q(z_i | x_j) in the estimate q(z_i) ~ sum_j r_ij q(z_i | x_j)."""
    if estimator == "mws":
        return torch.full((batch, batch), -math.log(dataset_size * batch), dtype=like.dtype, device=like.device)
    # MSS: z_i came from x_i, whose own term has weight 1/N in q(z_i) = 1/N sum_n q(z_i | x_n); the other B - 1
    # examples are a uniform draw from the other N - 1 and share the remaining mass (N - 1) / N
    other = math.log(dataset_size - 1) - math.log(dataset_size * (batch - 1))
    weights = torch.full((batch, batch), other, dtype=like.dtype, device=like.device)
    return weights.fill_diagonal_(-math.log(dataset_size))


def beta_tc_terms(
    z: Tensor,
    q: Distribution,
    log_px: Tensor,
    *,
    dataset_size: int,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    log_pz: Tensor | None = None,
    estimator: str = "mss",
) -> dict[str, Tensor]:
    """The beta-TC-VAE objective: the KL split into index-code MI, total correlation and dimension-wise KL.

    With q(z) = 1/N sum_n q(z|x_n) the aggregate posterior over the N training examples,
    E[log q(z|x) - log p(z)] = MI (E[log q(z|x) - log q(z)]) + TC (E[log q(z) - log prod_d q(z_d)])
    + dim_kl (E[log prod_d q(z_d) - log p(z)]); the loss weights them by alpha, beta and gamma. log q(z_i) and
    log q(z_id) are estimated from the batch, log q(z_i) ~ log sum_j r_ij q(z_i | x_j):
    ``mss`` (minibatch stratified sampling, in its symmetric form; the default): r_ii = 1/N, r_ij = (N - 1) /
    (N (B - 1)), an unbiased estimate of q(z_i), so independent latent dimensions give TC ~ 0;
    ``mws`` (minibatch weighted sampling, the paper's main estimator): r_ij = 1/(N B) for all j. MWS weights the
    batch as if it held N B examples: for N >> B its terms are those of MSS shifted by about log N (mi),
    (D - 1) log N (tc) and -D log N (dim_kl), constants that leave the gradients nearly alone but make the logged
    terms misleading (a posterior that ignores x gives exactly mi = log N, tc = (D - 1) log N), hence not the
    default. Either way the three terms add up to ``kl`` (up to rounding), as each is a difference of the same log
    densities, and alpha = beta = gamma = 1 is the single-sample ELBO.

    Args:
        z: one sample per example from the posterior, shape (B, D), B >= 2, reparameterised.
        q: the posterior q(z|x), factorised over the D dimensions with batch shape (B, D) (e.g. ``Normal``).
        log_px: log p(x | z) per example, shape (B,).
        dataset_size: N, the number of training examples the batch is drawn from (>= B): the estimators weight the
            batch's posteriors as a sample of the N that make up q(z); it shifts the logged terms, not the ELBO.
        alpha, beta, gamma: weights of MI, TC and dimension-wise KL in the loss.
        log_pz: log p(z) of the prior, per dimension (B, D) for a factorised prior or per example (B,) for one that
            is not (then ``dim_kl`` is KL(prod_d q(z_d) || p(z)), no longer a sum over dimensions); None: the
            standard normal prior.
        estimator: one of ``TCEstimator``.

    Returns:
        ``loss`` = -(reconstruction - alpha mi - beta tc - gamma dim_kl), ``elbo`` (reconstruction - kl),
        ``reconstruction`` (mean log p(x|z)), ``mi``, ``tc``, ``dim_kl`` and ``kl`` (mean log q(z|x) - log p(z),
        the single-sample KL), each a batch mean.

    References: Chen et al. 2018, arXiv:1802.04942 (appendix C: MWS and MSS).
    """
    check_choice("TC estimator", estimator, TCEstimator)
    check_positive_int(dataset_size=dataset_size)
    if z.dim() != 2 or z.shape[0] < 2 or q.batch_shape != z.shape or q.event_shape != ():
        raise ValueError(
            "beta_tc_terms needs z of shape (B, D) with B >= 2 and a posterior factorised over D with batch shape "
            f"(B, D); got z {tuple(z.shape)}, q batch {tuple(q.batch_shape)}, event {tuple(q.event_shape)}"
        )
    batch = z.shape[0]
    if dataset_size < batch:
        raise ValueError(f"dataset_size ({dataset_size}) must be at least the batch size ({batch})")
    if log_px.shape != (batch,):
        raise ValueError(f"log_px must have shape ({batch},), one value per example, got {tuple(log_px.shape)}")
    if log_pz is None:
        log_pz = Normal(torch.zeros_like(z), torch.ones_like(z), validate_args=False).log_prob(z)
    if log_pz.shape not in (z.shape, (batch,)):
        raise ValueError(f"log_pz must have shape {tuple(z.shape)} or ({batch},), got {tuple(log_pz.shape)}")
    log_pz = log_pz.sum(-1) if log_pz.dim() == 2 else log_pz
    log_q_x = q.log_prob(z).sum(-1)  # (B,)
    pairwise = q.log_prob(z.unsqueeze(1))  # [i, j, d] = log q(z_id | x_j), (B, B, D)
    log_r = _aggregate_log_weights(batch, dataset_size, estimator, z)  # (B, B)
    log_qz = torch.logsumexp(log_r + pairwise.sum(-1), dim=1)
    log_prod_qzd = torch.logsumexp(log_r.unsqueeze(-1) + pairwise, dim=1).sum(-1)
    reconstruction = log_px.mean()
    mi, tc = (log_q_x - log_qz).mean(), (log_qz - log_prod_qzd).mean()
    dim_kl, kl = (log_prod_qzd - log_pz).mean(), (log_q_x - log_pz).mean()
    return {
        "loss": -(reconstruction - alpha * mi - beta * tc - gamma * dim_kl),
        "elbo": reconstruction - kl,
        "reconstruction": reconstruction,
        "mi": mi,
        "tc": tc,
        "dim_kl": dim_kl,
        "kl": kl,
    }


Kernel = Literal["imq", "rbf"]


def _kernel_matrix(a: Tensor, b: Tensor, kernel: str, scale: float) -> Tensor:
    """k(a_i, b_j), shape (N, M), for samples (N, D) and (M, D)."""
    # the differences rather than cdist or |a|^2 + |b|^2 - 2ab: exact at a = b and with finite gradients there
    squared = (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)
    if kernel == "imq":
        return scale / (scale + squared)
    return torch.exp(-squared / scale)


def _off_diagonal_mean(matrix: Tensor) -> Tensor:
    """Mean of a square matrix's entries off the diagonal."""
    n = matrix.shape[0]
    return (matrix.sum() - matrix.diagonal().sum()) / (n * (n - 1))


def mmd(x: Tensor, y: Tensor, *, kernel: str = "imq", scale: float | None = None) -> Tensor:
    """The unbiased estimate of MMD^2 between the distributions of two samples, a scalar.

    MMD^2 = mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j) (the U-statistic):
    its expectation is 0 when x and y come from one distribution, so a single estimate can be slightly negative.
    The same tensor twice gives exactly -(2 / N) (1 - mean_{i != j} k(x_i, x_j)) <= 0: the cross term counts the
    N pairs i = j (k = 1) that the within-sample terms leave out.

    Kernels, on squared distances r = ||a - b||^2: ``imq`` k = C / (C + r) (inverse multiquadric, heavy-tailed, so
    that distant samples still get a gradient: WAE's choice) and ``rbf`` k = exp(-r / C).

    Args:
        x: shape (N, D), N >= 2.
        y: shape (M, D), M >= 2.
        kernel: one of ``Kernel``.
        scale: C, the bandwidth. None: C = 2 D, WAE's rule C = 2 D sigma^2 for a prior N(0, sigma^2 I) with sigma = 1,
            used for both kernels; pass 2 D sigma^2 for another prior scale.

    References: Gretton et al. 2012, JMLR 13 (the unbiased estimate); Tolstikhin et al. 2017, arXiv:1711.01558
        (IMQ kernel, C = 2 D sigma^2).
    """
    check_choice("kernel", kernel, Kernel)
    check_positive(scale=scale)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(
            "mmd needs two samples of shapes (N, D) and (M, D) with N, M >= 2, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    # 2 D is the expected squared distance of two independent N(0, I) draws: at that distance the IMQ kernel is 1/2
    # and the RBF kernel 1/e, so on prior-like samples neither saturates nor vanishes. A fixed rule rather than the
    # median heuristic: the median follows the batch (so the loss's scale would change from batch to batch, and a
    # shrinking posterior would shrink the kernel that is meant to see it)
    scale = 2.0 * x.shape[1] if scale is None else scale
    within_x = _off_diagonal_mean(_kernel_matrix(x, x, kernel, scale))
    within_y = _off_diagonal_mean(_kernel_matrix(y, y, kernel, scale))
    return within_x + within_y - 2 * _kernel_matrix(x, y, kernel, scale).mean()


def mmd_terms(
    z: Tensor,
    log_px: Tensor,
    *,
    prior_samples: Tensor,
    weight: float = 10.0,
    kl: Tensor | None = None,
    kl_weight: float = 0.0,
    kernel: str = "imq",
    scale: float | None = None,
) -> dict[str, Tensor]:
    """The WAE-MMD / InfoVAE objective: reconstruction plus a weighted MMD between posterior and prior samples.

    The MMD compares the aggregate posterior q(z) (one code per example) with the prior instead of penalising
    each q(z|x), so codes need not overlap and the posterior may be deterministic (WAE). InfoVAE's objective
    E[log p(x|z)] - (1 - a) KL(q(z|x) || p(z)) - (a + l - 1) D(q(z) || p(z)) is ``kl_weight`` = 1 - a and
    ``weight`` = a + l - 1 with D the MMD; ``kl_weight`` = 0 (the default) is the WAE-MMD.

    Args:
        z: codes, one per example, shape (B, D), B >= 2 (posterior samples or, for a WAE, encoder outputs).
        log_px: log p(x | z) per example, shape (B,).
        prior_samples: draws from the prior, shape (M, D), M >= 2.
        weight: weight of the MMD in the loss; 10 is WAE's for MNIST with a summed reconstruction term (it has to
            match the scale of the reconstruction).
        kl: KL(q(z|x) || p(z)) per example (B,) or per example and dimension (B, D), for InfoVAE; None: no KL term.
        kl_weight: weight of the KL in the loss (needs ``kl`` when > 0).
        kernel, scale: as in ``mmd``.

    Returns:
        ``loss`` = -reconstruction + weight mmd (+ kl_weight kl), ``reconstruction`` (mean log p(x|z)), ``mmd``;
        with ``kl`` also ``kl`` (batch mean) and ``elbo`` (reconstruction - kl, for comparison).

    References: Tolstikhin et al. 2017, arXiv:1711.01558; Zhao et al. 2017, arXiv:1706.02262.
    """
    if kl is None and kl_weight != 0.0:
        raise ValueError(f"kl_weight is {kl_weight} but no kl was given: pass the KL per example or kl_weight=0")
    reconstruction = log_px.mean()
    discrepancy = mmd(z, prior_samples, kernel=kernel, scale=scale)
    terms = {"loss": -reconstruction + weight * discrepancy, "reconstruction": reconstruction, "mmd": discrepancy}
    if kl is not None:
        kl_mean = (kl.sum(1) if kl.dim() == 2 else kl).mean()
        terms.update(loss=terms["loss"] + kl_weight * kl_mean, kl=kl_mean, elbo=reconstruction - kl_mean)
    return terms


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
