"""Generators and discriminators for GANs: plain nn.Modules, no Lightning.

A generator maps latent vectors (B, in_dim) to examples (B, *data_shape); a discriminator maps examples
(and, when it is class-conditional, their labels) to one raw score per example (B,). Two families:

- ``mlp``: fully connected, for any data shape, including 2D points (data_shape (2,)) and 8x8 digits;
- ``dcgan``: DCGAN-style convolutions with stride 2 for images whose sides halve ``len(channels)`` times
  (8x8, 28x28, 32x32, 64x64, ...): batch norm in the generator, and in the discriminator unless it is
  regularised by a gradient penalty or spectral norm (batch norm makes D(x_i) depend on the other examples,
  which breaks a per-example gradient penalty).

``WarmupEMA`` is the weight average of a generator that the GAN samples from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.optim.swa_utils import AveragedModel, update_bn

from dgm_lightning.checks import check_choice

Architecture = Literal["mlp", "dcgan"]  # the default nets' families (see the module docstring)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if len(shape) not in (1, 3) or any(int(s) <= 0 for s in shape):
        raise ValueError(f"data shape must be (D,) or (C, H, W) with positive sizes, got {tuple(shape)}")
    return tuple(int(s) for s in shape)


class RangeOutput(nn.Module):
    """tanh mapped onto (low, high): a generator's outputs land in the data's value range."""

    def __init__(self, value_range: Sequence[float]) -> None:
        super().__init__()
        self.low, self.high = float(value_range[0]), float(value_range[1])

    def forward(self, x: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * (torch.tanh(x) + 1) / 2


def default_dcgan_channels(data_shape: Sequence[int]) -> list[int]:
    """Discriminator channels for DCGAN nets: one stride-2 layer per halving while the map stays >= 4 pixels
    (8x8: 1, 28x28: 2, 32x32: 3, 64x64: 4), starting at 64 channels and doubling."""
    side = min(data_shape[1:])
    halvings = 0
    while side % 2 == 0 and side // 2 >= 4:
        side //= 2
        halvings += 1
    return [64 * 2**i for i in range(max(halvings, 1))]


def _dcgan_start(data_shape: Sequence[int], channels: Sequence[int]) -> tuple[int, int]:
    """Size (h, w) of the smallest feature map; the image sides must be divisible by 2 ** len(channels)."""
    _, h, w = data_shape
    factor = 2 ** len(channels)
    if not channels or any(c <= 0 for c in channels):
        raise ValueError(f"dcgan nets need one or more positive channel sizes, got {list(channels)}")
    if h % factor or w % factor:
        raise ValueError(
            f"dcgan nets halve the image {len(channels)} times (one per channel size {list(channels)}), so its sides "
            f"must be divisible by {factor}; {h}x{w} is not: give fewer hidden_dims"
        )
    return h // factor, w // factor


class MLPGenerator(nn.Sequential):
    """Latent (B, in_dim) -> MLP with ReLU -> (B, *out_shape); images end in tanh mapped onto ``value_range``,
    vectors (out_shape (D,)) are left unbounded.

    Args:
        in_dim: latent size (plus the number of classes for a conditional generator).
        out_shape: (D,) or (C, H, W).
        hidden_dims: sizes of the hidden layers.
        value_range: (low, high) of image values.
    """

    def __init__(
        self,
        in_dim: int,
        out_shape: Sequence[int],
        hidden_dims: Sequence[int] = (256, 256),
        value_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        shape = _check_shape(out_shape)
        if not hidden_dims:
            raise ValueError("an MLP generator needs at least one hidden layer")
        layers: list[nn.Module] = []
        for n_in, n_out in zip([in_dim, *hidden_dims[:-1]], hidden_dims, strict=True):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(hidden_dims[-1], math.prod(shape)))
        if len(shape) == 3:
            layers += [RangeOutput(value_range), nn.Unflatten(1, shape)]
        super().__init__(*layers)


class MLPFeatures(nn.Sequential):
    """Examples (B, *in_shape) -> flatten -> MLP with LeakyReLU -> features (B, hidden_dims[-1])."""

    def __init__(self, in_shape: Sequence[int], hidden_dims: Sequence[int] = (256, 256)) -> None:
        shape = _check_shape(in_shape)
        if not hidden_dims:
            raise ValueError("an MLP discriminator needs at least one hidden layer")
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip([math.prod(shape), *hidden_dims[:-1]], hidden_dims, strict=True):
            layers += [nn.Linear(n_in, n_out), nn.LeakyReLU(0.2)]
        super().__init__(*layers)
        self.out_dim = hidden_dims[-1]


class DCGANGenerator(nn.Module):
    """DCGAN generator: linear projection to a small map, stride-2 transposed convolutions with batch norm and
    ReLU doubling its size, a final convolution to C channels and tanh mapped onto ``value_range``.

    Args:
        in_dim: latent size (plus the number of classes for a conditional generator).
        data_shape: (C, H, W); H and W must be divisible by 2 ** len(channels).
        channels: the discriminator's channels from the input side; the generator mirrors them.
        value_range: (low, high) of the images' values.

    References: Radford et al. 2015, arXiv:1511.06434.
    """

    def __init__(
        self,
        in_dim: int,
        data_shape: Sequence[int],
        channels: Sequence[int],
        value_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        c, _, _ = _check_shape(data_shape)
        h0, w0 = _dcgan_start(data_shape, channels)
        up = list(reversed(channels))  # widest map first
        self.project = nn.Sequential(
            nn.Linear(in_dim, up[0] * h0 * w0, bias=False),
            nn.Unflatten(1, (up[0], h0, w0)),
            nn.BatchNorm2d(up[0]),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        for n_in, n_out in zip(up, [*up[1:], up[-1]], strict=True):
            # kernel 4, stride 2, padding 1 exactly doubles the map
            layers += [nn.ConvTranspose2d(n_in, n_out, 4, 2, 1, bias=False), nn.BatchNorm2d(n_out), nn.ReLU()]
        layers += [nn.Conv2d(up[-1], c, 3, padding=1), RangeOutput(value_range)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.project(z))


class DCGANFeatures(nn.Sequential):
    """DCGAN discriminator body: stride-2 convolutions with LeakyReLU (batch norm after all but the first when
    ``batch_norm``), flattened to features (B, channels[-1] * h * w)."""

    def __init__(self, data_shape: Sequence[int], channels: Sequence[int], *, batch_norm: bool = True) -> None:
        c, _, _ = _check_shape(data_shape)
        h0, w0 = _dcgan_start(data_shape, channels)
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip([c, *channels[:-1]], channels, strict=True)):
            layers.append(nn.Conv2d(n_in, n_out, 4, 2, 1, bias=not (batch_norm and i > 0)))
            if batch_norm and i > 0:
                layers.append(nn.BatchNorm2d(n_out))
            layers.append(nn.LeakyReLU(0.2))
        super().__init__(*layers, nn.Flatten())
        self.out_dim = channels[-1] * h0 * w0


class Discriminator(nn.Module):
    """Features phi(x) (B, F), then a linear score; with ``num_classes`` a projection term <embed(y), phi(x)>
    is added, which conditions the score on the label.

    Args:
        features: a module x -> (B, F) with an ``out_dim`` attribute (F), or pass ``feature_dim``.
        num_classes: classes of a projection discriminator, None for an unconditional one.
        feature_dim: F when ``features`` has no ``out_dim``.

    References: projection discriminator, Miyato & Koyama 2018, arXiv:1802.05637.
    """

    def __init__(self, features: nn.Module, *, num_classes: int | None = None, feature_dim: int | None = None) -> None:
        super().__init__()
        dim = feature_dim if feature_dim is not None else getattr(features, "out_dim", None)
        if dim is None:
            raise ValueError("pass feature_dim for a features module without an out_dim attribute")
        self.features = features
        self.head = nn.Linear(dim, 1)
        self.embed = None if num_classes is None else nn.Embedding(num_classes, dim)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        h = self.features(x)
        score = self.head(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("this discriminator is class-conditional: pass labels")
            score = score + (self.embed(labels.long()) * h).sum(1)
        return score


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral-normalise the weight of every linear, convolution and embedding layer of ``module`` (in place).

    References: Miyato et al. 2018, arXiv:1802.05957.
    """
    for layer in list(module.modules()):
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
            spectral_norm(layer)
    return module


def build_generator(
    architecture: Architecture,
    in_dim: int,
    data_shape: Sequence[int],
    hidden_dims: Sequence[int] | None,
    value_range: Sequence[float],
) -> nn.Module:
    """Default generator for ``architecture`` (``mlp`` or ``dcgan``); hidden_dims are the discriminator's, mirrored."""
    check_choice("architecture", architecture, Architecture)
    if architecture == "mlp":
        return MLPGenerator(in_dim, data_shape, tuple(reversed(hidden_dims or (256, 256))), value_range)
    shape = _check_image(data_shape)
    return DCGANGenerator(in_dim, shape, hidden_dims or default_dcgan_channels(shape), value_range)


def build_discriminator(
    architecture: Architecture,
    data_shape: Sequence[int],
    hidden_dims: Sequence[int] | None,
    *,
    num_classes: int | None = None,
    batch_norm: bool = True,
) -> Discriminator:
    """Default discriminator for ``architecture``; ``batch_norm`` only concerns ``dcgan``."""
    check_choice("architecture", architecture, Architecture)
    if architecture == "mlp":
        features: nn.Module = MLPFeatures(data_shape, hidden_dims or (256, 256))
    else:
        shape = _check_image(data_shape)
        features = DCGANFeatures(shape, hidden_dims or default_dcgan_channels(shape), batch_norm=batch_norm)
    return Discriminator(features, num_classes=num_classes)


def build_networks(
    architecture: Architecture,
    in_dim: int,
    data_shape: Sequence[int],
    hidden_dims: Sequence[int] | None,
    value_range: Sequence[float],
    *,
    num_classes: int | None = None,
    batch_norm: bool = True,
    spectral_norm: bool = False,
    generator: nn.Module | None = None,
    discriminator: nn.Module | None = None,
) -> tuple[nn.Module, nn.Module]:
    """A GAN's generator and discriminator: those given, or the defaults of ``architecture`` (``build_generator``,
    ``build_discriminator``); the discriminator's layers spectral-normalised when ``spectral_norm``."""
    if generator is None:
        generator = build_generator(architecture, in_dim, data_shape, hidden_dims, value_range)
    if discriminator is None:
        discriminator = build_discriminator(
            architecture, data_shape, hidden_dims, num_classes=num_classes, batch_norm=batch_norm
        )
    if spectral_norm:
        apply_spectral_norm(discriminator)
    return generator, discriminator


def _check_image(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = _check_shape(shape)
    if len(shape) != 3:
        raise ValueError(f"the dcgan architecture is for images (C, H, W), got data shape {shape}; use mlp")
    return shape  # type: ignore[return-value]


class WarmupEMA(AveragedModel):
    """An exponential moving average of a network's weights and buffers whose decay warms up.

    The first update copies the network; the update after n earlier ones sets ``avg = d avg + (1 - d) w`` with
    ``d = min(decay, 0.5 ** (1 / (rampup * n)))``: the average's half-life is at most ``rampup`` times the updates
    so far (StyleGAN2's ramp-up), so the average of a short run follows its recent weights instead of the initial
    ones, and the configured ``decay`` takes over once ``rampup * n`` reaches its half-life (at n = 34,640 for
    0.999 and 0.02). Integer buffers (batch norm's ``num_batches_tracked``) are counters and are copied. n is
    ``AveragedModel``'s ``n_averaged`` buffer, so the warm-up state is saved in checkpoints with the weights.
    Chosen by measurement (benchmarks/gan_ema.py, DCGAN on Fashion-MNIST): TensorFlow's rule, min(decay, (1 + n) /
    (10 + n)), sampled worse than this one after 1 and 3 epochs, and a fixed decay far worse.

    Args:
        module: the network to average (a copy is kept).
        decay: the decay once warmed up, in (0, 1).
        rampup: the half-life's ceiling as a fraction of the updates so far, > 0.

    References: Karras et al. 2020 (StyleGAN2), arXiv:1912.04958 (``ema_rampup``); Yazıcı et al. 2018,
        arXiv:1806.04498.
    """

    def __init__(self, module: nn.Module, decay: float, rampup: float) -> None:
        super().__init__(module, multi_avg_fn=self._average, use_buffers=True)
        self.decay = float(decay)
        self.rampup = float(rampup)
        # whether the averaged weights moved since batch norm's statistics were recomputed for them
        self.statistics_stale = True

    def decay_after(self, num_updates: int) -> float:
        """The decay of the update that follows ``num_updates`` >= 1 earlier ones (the first one copies)."""
        return min(self.decay, 0.5 ** (1 / (self.rampup * num_updates)))

    def fresh_module(self, inputs: Callable[[], list[Tensor]]) -> nn.Module:
        """The averaged network, its batch-norm statistics recomputed on ``inputs()`` first if its weights moved
        since they last were (``recompute_batch_norm``)."""
        if self.statistics_stale:
            self.recompute_batch_norm(inputs())
        return self.module

    def update_parameters(self, model: nn.Module) -> None:
        super().update_parameters(model)
        self.statistics_stale = True

    @torch.no_grad()
    def recompute_batch_norm(self, inputs: list[Tensor]) -> None:
        """Set the average's batch-norm statistics to those of its own activations on ``inputs``.

        An average of the running statistics is not the statistics of the averaged weights: on Fashion-MNIST the
        average sampled 3 to 4 FID worse than the raw generator until they were recomputed (benchmarks/gan_ema.py).
        ``torch.optim.swa_utils.update_bn`` does it (a cumulative mean over the inputs); a network without batch
        norm is left as it is.
        """
        update_bn(inputs, self.module)
        self.statistics_stale = False

    @torch.no_grad()
    def _average(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        # AveragedModel calls this once per (device, dtype) group, after its own host sync on n_averaged
        decay = self.decay_after(int(num_averaged))
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - decay)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)
