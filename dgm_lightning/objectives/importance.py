"""The importance-weighted training objectives of a VAE: IWAE, MIWAE and PIWAE (Burda et al. 2015; Rainforth et al.
2018)."""

from __future__ import annotations

from torch import Tensor

from dgm_lightning.checks import check_positive_int
from dgm_lightning.objectives.elbo import iwae_bound


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
    PIWAE (the IWAE for the decoder, MIWAE for the encoder) is ``piwae_terms``.

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


def piwae_terms(
    generative: tuple[Tensor, Tensor, Tensor],
    inference: tuple[Tensor, Tensor, Tensor],
    *,
    num_groups: int,
    beta: float = 1.0,
) -> dict[str, Tensor]:
    """The PIWAE objective: the generative networks (decoder, prior) trained on the IWAE bound of all S samples, the
    inference network (encoder) on MIWAE(M, S / M) of the same samples.

    Rainforth et al. show the IWAE's gradient growing more informative with S for the generative networks and less
    for the inference network; PIWAE gives each the bound that suits it. Two losses for two sets of parameters in
    one backward pass: each is computed where only its own networks carry gradients, so the caller passes the log
    weights twice, and the loss is the IWAE loss plus the MIWAE loss minus its detached value (zero in value, the
    MIWAE's gradient in the encoder). The logged ``loss`` is so the IWAE loss, as for ``iwae_terms``.

    Args:
        generative: (log_px, log_pz, log_q), each (S, B), with the encoder held fixed (samples and log q detached):
            their gradients reach the decoder and a learned prior only.
        inference: the same, with the decoder and prior held fixed (their parameters detached) and the samples
            reparameterised: their gradients reach the encoder only.
        num_groups: M, which must divide S.
        beta: weight of the KL part of the log weights, in both bounds (see ``iwae_terms``).

    Returns:
        ``loss``, and ``iwae``, ``elbo``, ``reconstruction``, ``kl`` as in ``iwae_terms``, and ``miwae`` (the encoder's
        bound, beta = 1).

    References: Rainforth et al. 2018, arXiv:1802.04537; Burda et al. 2015, arXiv:1509.00519.
    """
    terms = iwae_terms(*generative, beta=beta)
    encoder = miwae_terms(*inference, num_groups=num_groups, beta=beta)
    terms["loss"] = terms["loss"] + (encoder["loss"] - encoder["loss"].detach())
    terms["miwae"] = encoder["miwae"].detach()
    return terms
