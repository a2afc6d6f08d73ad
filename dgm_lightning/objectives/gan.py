"""The GAN losses of discriminator and generator, and the gradient penalties of the critic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from dgm_lightning.checks import check_choice

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
