"""Checks of a GAN's settings and of what it is given (networks, schedulers, a Trainer), each failing with an error
that names the setting, the value seen and what it must be."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from dgm_lightning.checks import check_choice, check_fraction, check_non_negative, check_positive, check_positive_int
from dgm_lightning.compat import is_batch_norm
from dgm_lightning.nets.gan_nets import Architecture
from dgm_lightning.objectives import GANLoss

ClipAlgorithm = Literal["norm", "value"]


def check_gan_settings(
    *,
    data_shape: Sequence[int],
    latent_dim: int,
    architecture: str,
    loss: str,
    n_critic: int,
    gp_weight: float,
    r1_gamma: float,
    r1_interval: int,
    instance_noise: float,
    label_smoothing: float,
    gradient_clip_val: float | None,
    gradient_clip_algorithm: str,
    ema_decay: float | None,
    ema_rampup: float,
) -> None:
    """Refuse settings of ``GAN`` (the arguments of the same names) that are out of range or do not go together."""
    if len(data_shape) not in (1, 3):
        raise ValueError(f"data_shape must be (C, H, W) for images or (D,) for vectors, got {tuple(data_shape)}")
    check_positive_int(latent_dim=latent_dim, n_critic=n_critic, r1_interval=r1_interval)
    check_choice("loss", loss, GANLoss)
    check_choice("architecture", architecture, Architecture)
    check_choice("gradient_clip_algorithm", gradient_clip_algorithm, ClipAlgorithm)
    check_positive(gradient_clip_val=gradient_clip_val, ema_rampup=ema_rampup)
    check_non_negative(gp_weight=gp_weight, r1_gamma=r1_gamma, instance_noise=instance_noise)
    check_fraction(label_smoothing=label_smoothing)
    if label_smoothing and loss in ("wasserstein", "hinge"):
        raise ValueError(f"label_smoothing applies to the cross-entropy and least-squares losses, not to {loss!r}")
    if ema_decay is not None and not 0 < ema_decay < 1:
        raise ValueError(f"ema_decay must be in (0, 1) or None (no average), got {ema_decay}")


def check_per_example_discriminator(discriminator: nn.Module) -> None:
    """Refuse a discriminator with batch norm where a gradient penalty or spectral norm needs per-example scores."""
    if any(is_batch_norm(m) for m in discriminator.modules()):
        raise ValueError(
            "the discriminator has batch norm, which mixes examples and so breaks a gradient penalty or spectral "
            "norm; use a discriminator without batch norm (layer/instance norm or none)"
        )


def check_generator_output(out: Tensor, data_shape: tuple[int, ...]) -> None:
    """Refuse a generator's output unless it is a batch of examples of ``data_shape``."""
    if out.shape[1:] != data_shape:
        raise ValueError(
            f"the generator must output shape (B, {', '.join(map(str, data_shape))}), got {tuple(out.shape)}"
        )


def check_critic_output(out: Tensor, batch_size: int) -> None:
    """Refuse a discriminator's output unless it is one score per example."""
    if out.numel() != batch_size:
        raise ValueError(
            "the discriminator must output one score per example, shape (B,) or (B, 1), "
            f"got {tuple(out.shape)} for a batch of {batch_size}"
        )


def check_trainer_clipping(trainer: L.Trainer) -> None:
    """Refuse the Trainer's gradient clipping, which manual optimization cannot do, pointing at the GAN's own."""
    if trainer.gradient_clip_val:
        raise ValueError(
            f"GAN clips the gradients of its two networks itself: remove Trainer(gradient_clip_val="
            f"{trainer.gradient_clip_val}) (--trainer.gradient_clip_val) and set GAN(gradient_clip_val=...) "
            "(--model.gradient_clip_val) instead"
        )


def epoch_scheduler(lr_scheduler: LRSchedulerCallable | None) -> LRSchedulerCallable | None:
    """``lr_scheduler``, refusing a ReduceLROnPlateau: the GAN steps its schedulers once per epoch, without a metric."""
    if lr_scheduler is None:
        return None

    def build(optimizer: torch.optim.Optimizer) -> Any:
        scheduler = lr_scheduler(optimizer)
        if isinstance(scheduler, ReduceLROnPlateau):
            raise ValueError(
                f"GAN steps its schedulers once per epoch without a metric, so {type(scheduler).__name__} (a "
                "ReduceLROnPlateau) cannot work; choose an epoch-based scheduler (e.g. --model.lr_scheduler_g "
                "StepLR --model.lr_scheduler_g.step_size 10)"
            )
        return scheduler

    return build
