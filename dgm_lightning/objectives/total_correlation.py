"""The beta-TC-VAE objective: the KL split into index-code mutual information, total correlation and dimension-wise KL
(Chen et al. 2018)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.distributions import Distribution, Normal

from dgm_lightning.checks import check_choice, check_positive_int

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
