"""Normalizing flows trained by maximum likelihood: RealNVP and Glow, with exact log-likelihood."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributions import AffineTransform, ComposeTransform, Independent, Normal, SigmoidTransform, Transform
from typing_extensions import override

from dgm_lightning import objectives
from dgm_lightning.base import GenerativeModel
from dgm_lightning.checks import check_choice, check_positive_int
from dgm_lightning.nets.flow_layers import FlowArchitecture, multiscale_flow, vector_flow
from dgm_lightning.objectives import Objective
from dgm_lightning.optimizers import check_injected

Preprocessing = Literal["logit", "none"]


class Flow(GenerativeModel):
    """A normalizing flow ``z = f(x)`` with a Gaussian base, trained by maximum likelihood.

    Likelihood bookkeeping, from data x in ``value_range`` to the base:

    1. dequantization (when ``quantization_levels`` is set): x' = x + delta * u, u ~ U[0, 1)^D, where
       delta = (high - low) / (levels - 1) is one quantization step;
    2. ``logit`` preprocessing: v = (x' - low) / (delta * levels) in [0, 1), squashed to
       [alpha, 1 - alpha] and passed through the logit (for ``none``: x' is used as it is);
    3. the flow, then the base distribution.

    ``log_prob(x)`` is the exact log-density of x in the units of ``value_range``: the log-determinants
    of steps 2 and 3 are all included. ``{stage}/nll`` is its negative mean on dequantized data;
    ``{stage}/bpd`` is bits per dimension of the discrete data, (nll - D log delta) / (D log 2) (the
    Jensen bound of the dequantized likelihood, the number papers report; at most log2(levels) for a
    model no better than uniform). Without quantization ``bpd`` is nll / (D log 2). With ``logit``, the
    data space maps onto a bounded part of the base space (the margin ``logit_alpha``); the base's mass
    outside it is lost, so the density integrates to slightly less than 1 and the NLL is an upper bound.

    For scikit-learn's 8x8 digits set ``quantization_levels: 17``: their pixels take the 17 values k/16.

    Args:
        architecture: ``realnvp`` or ``glow``: multi-scale for images (C, H, W), coupling stacks for vectors (D,).
        data_shape: (C, H, W) images or (D,) vectors.
        value_range: (low, high) of the data.
        num_classes: makes the base distribution class-conditional: a learned mean and scale per class.
        num_scales: L, scales of the multi-scale image flow (ignored for vectors).
        num_steps: K, flow steps per scale (images) or coupling steps (vectors).
        hidden_dims: widths of the coupling networks' hidden layers, one entry per hidden layer: channels for
            images (a 3x3 convolution into the first, 1x1 between them, a 3x3 out: (64, 64) is RealNVP's and Glow's
            network), features for vectors (an MLP).
        quantization_levels: number of discrete values per dimension the data takes (256 for 8-bit
            images), or None for continuous data (no dequantization).
        preprocessing: ``logit`` (images) or ``none`` (unbounded or continuous data such as 2D toys).
        logit_alpha: squashing margin of the logit preprocessing, in (0, 0.5).
        optimizer: builds the optimizer from the parameters (None: Adam with lr 1e-3); on the command line
            ``--model.optimizer AdamW --model.optimizer.lr 3e-4``.
        lr_scheduler: builds a learning-rate scheduler from the optimizer, stepped once per epoch (None: a constant
            rate); e.g. ``--model.lr_scheduler CosineAnnealingLR --model.lr_scheduler.T_max 50``.
        compile: compile the networks with torch.compile when training starts (see ``GenerativeModel``).
        channels_last: channels-last weights and activations in training (see ``GenerativeModel``).
        flow: your own invertible module: ``forward(x) -> (z, logdet)`` of shape (B, *data_shape) and (B,),
            and ``inverse(z)`` (``architecture``, ``num_scales``, ``num_steps``, ``hidden_dims`` are then unused).

    The default flows' ActNorm layers initialise from the first batch they see in training mode (Glow's
    data-dependent initialisation); the state is saved in checkpoints.

    References: Dinh et al. 2016, arXiv:1605.08803; Kingma & Dhariwal 2018, arXiv:1807.03039;
        dequantization, Theis et al. 2015, arXiv:1511.01844.
    """

    progress_bar_terms = ("nll",)  # the loss, under the name the flow literature reads

    def __init__(
        self,
        architecture: FlowArchitecture = "glow",
        *,
        data_shape: Sequence[int] = (1, 28, 28),
        value_range: Sequence[float] = (0.0, 1.0),
        num_classes: int | None = None,
        num_scales: int = 2,
        num_steps: int = 4,
        hidden_dims: Sequence[int] = (64, 64),
        quantization_levels: int | None = 256,
        preprocessing: Preprocessing = "logit",
        logit_alpha: float = 0.05,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        channels_last: bool = True,
        flow: nn.Module | None = None,
    ) -> None:
        super().__init__(data_shape=data_shape, value_range=value_range, num_classes=num_classes,
                         compile=compile, channels_last=channels_last)  # fmt: skip
        self.save_hyperparameters(ignore=["flow", "optimizer", "lr_scheduler"])
        _check_settings(
            architecture=architecture, preprocessing=preprocessing, data_shape=self.data_shape, num_scales=num_scales,
            num_steps=num_steps, quantization_levels=quantization_levels, logit_alpha=logit_alpha,
        )  # fmt: skip
        check_injected(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.quantization_levels = quantization_levels
        if flow is None:
            if len(self.data_shape) == 3:
                flow = multiscale_flow(
                    architecture, self.data_shape, num_scales=num_scales, num_steps=num_steps, hidden_dims=hidden_dims
                )
            else:
                flow = vector_flow(architecture, self.data_shape[0], num_steps=num_steps, hidden_dims=hidden_dims)
        self.flow = flow
        self.preprocessing = preprocessing
        self.logit_alpha = logit_alpha
        dims = math.prod(self.data_shape)
        self.num_dims = dims
        if num_classes is None:
            self.register_buffer("base_loc", torch.zeros(dims))
            self.register_buffer("base_log_scale", torch.zeros(dims))
        else:
            # class-conditional base: a mean and log-scale per class, learned (zero-initialised: N(0, I))
            self.base_loc = nn.Parameter(torch.zeros(num_classes, dims))
            self.base_log_scale = nn.Parameter(torch.zeros(num_classes, dims))

    # -- likelihood bookkeeping -------------------------------------------------------------------

    @property
    def bin_width(self) -> float | None:
        """delta, one quantization step in the units of value_range (None for continuous data)."""
        low, high = self.value_range
        levels = self.quantization_levels
        return None if levels is None else (high - low) / (levels - 1)

    @property
    def preprocess(self) -> Transform:
        """The fixed bijection from data (value_range units) to the flow's input space, elementwise.

        Built on each use: a stored ``.inv`` transform holds a weak reference, lost when the model is copied.
        """
        if self.preprocessing == "none":
            return ComposeTransform([])
        alpha = self.logit_alpha
        low, high = self.value_range
        # dequantized data fill [low, low + delta * levels); continuous data fill [low, high]
        width = high - low if self.bin_width is None else self.bin_width * self.quantization_levels
        return ComposeTransform(
            [AffineTransform(-low / width, 1 / width), AffineTransform(alpha, 1 - 2 * alpha), SigmoidTransform().inv]
        )

    def dequantize(self, x: Tensor) -> Tensor:
        """Add uniform noise of one quantization step, x + delta * U[0, 1) (identity for continuous data)."""
        return x if self.bin_width is None else x + self.bin_width * torch.rand_like(x)

    def base_distribution(self, labels: Tensor | None) -> Independent:
        """The base over flattened z: batch shape () or (B,) for a class-conditional base, event (D,)."""
        if labels is None:
            return Independent(Normal(self.base_loc, self.base_log_scale.exp(), validate_args=False), 1)
        return Independent(Normal(self.base_loc[labels], self.base_log_scale[labels].exp(), validate_args=False), 1)

    def log_prob(self, x: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """Log-density of (continuous, already dequantized) x in value_range units, nats, shape (B,): exact for
        flows, an importance-weighted (IWAE) estimate for latent-variable models; differentiable (the flow's
        training objective is its negative mean), so wrap it in ``torch.no_grad()`` to evaluate.

        x is checked as training batches are; dequantized data reach one quantization step above value_range.
        """
        low, high = self.value_range
        dequantized = None if self.bin_width is None else (low, high + self.bin_width)
        labels = self.check_input(x, labels, "log_prob", value_range=dequantized)
        return self._log_prob(x, labels)

    def _log_prob(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """``log_prob`` without the input checks: for batches that ``unpack_batch`` has checked."""
        preprocess = self.preprocess
        y = preprocess(x)
        logdet_pre = _per_example_sum(preprocess.log_abs_det_jacobian(x, y))
        z, logdet_flow = self.flow(y)
        if z.shape != y.shape or logdet_flow.shape != (x.shape[0],):
            raise ValueError(
                f"the flow must map (B, {', '.join(map(str, self.data_shape))}) to the same shape and a "
                f"log-determinant of shape (B,), got {tuple(z.shape)} and {tuple(logdet_flow.shape)}"
            )
        return self.base_distribution(labels).log_prob(z.flatten(1)) + logdet_flow + logdet_pre

    def objective(self, batch) -> Objective:
        """The training objective on a batch as the DataModule yields it (data, or (data, labels)): ``loss`` (=
        ``nll``, the negative mean ``log_prob`` of the batch dequantized first) and ``bpd``."""
        x, labels = self.unpack_batch(batch)
        nll = -self._log_prob(self.dequantize(x), labels).mean()
        discrete = nll if self.bin_width is None else nll - self.num_dims * math.log(self.bin_width)
        terms = {"loss": nll, "nll": nll, "bpd": objectives.bits_per_dim(discrete, self.num_dims)}
        return Objective(terms=terms, batch_size=x.shape[0])

    # -- the sampling protocol ------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """Draw n examples (n, *data_shape) in value_range; ``temperature`` scales the base's spread.

        Quantized data come back on the grid of ``quantization_levels`` values (dequantization undone).
        """
        labels = self.default_labels(n) if labels is None else labels
        return self.from_noise(self.draw_noise(n, temperature), labels=labels)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of the standard normal noise of one sample (``from_noise``): (D,), the flattened data size."""
        return (self.num_dims,)

    def from_noise(self, noise: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """Examples (B, *data_shape) in value_range from standard normal noise (B, D): the base's reparameterisation,
        then the flow's inverse. ``sample`` scales the noise by its temperature; an exported sampler
        (``dgm_lightning.export``) is this map."""
        labels = self.check_noise(noise, labels)
        base = self.base_distribution(labels).base_dist
        z = base.loc + base.scale * noise
        x = self.preprocess.inv(self.flow.inverse(z.view(noise.shape[0], *self.data_shape)))
        low, high = self.value_range
        if self.bin_width is not None:
            x = low + torch.floor((x - low) / self.bin_width) * self.bin_width
        return x.clamp(low, high)

    # -- Lightning hooks -----------------------------------------------------------------------

    @override
    def predict_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        """For each input batch: the inputs and as many fresh samples (with the same labels)."""
        x, labels = self.unpack_batch(batch)
        return {"inputs": x, "samples": self.sample(x.shape[0], labels=labels)}


def _check_settings(
    *,
    architecture: str,
    preprocessing: str,
    data_shape: tuple[int, ...],
    num_scales: int,
    num_steps: int,
    quantization_levels: int | None,
    logit_alpha: float,
) -> None:
    """Refuse settings of a ``Flow`` that cannot work, each error naming the setting (the coupling networks' widths
    are checked where they are built: ``checks.check_hidden_dims``)."""
    check_choice("architecture", architecture, FlowArchitecture)
    check_choice("preprocessing", preprocessing, Preprocessing)
    check_positive_int(num_scales=num_scales, num_steps=num_steps)
    if len(data_shape) not in (1, 3):
        raise ValueError(f"data_shape must be (C, H, W) or (D,), got {data_shape}")
    if quantization_levels is not None and quantization_levels < 2:
        raise ValueError(f"quantization_levels must be >= 2 (or None for continuous data), got {quantization_levels}")
    if not 0 < logit_alpha < 0.5:
        raise ValueError(f"logit_alpha must be in (0, 0.5), got {logit_alpha}")


def _per_example_sum(t: Tensor) -> Tensor:
    """Sum elementwise log-determinants over each example: (B, ...) -> (B,)."""
    return t.flatten(1).sum(1)
