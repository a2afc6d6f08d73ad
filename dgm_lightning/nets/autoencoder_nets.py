"""Encoders and decoders for images: plain nn.Modules, no Lightning.

Encoders map (B, C, H, W) to a flat (B, out_dim) vector; decoders map (B, in_dim) to (B, C, H, W).
The conv pair works for any image size (8x8 digits, 28x28, 32x32, 64x64, ...): the decoder
retraces the encoder's feature-map sizes exactly instead of cropping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(s) <= 0 for s in shape):
        raise ValueError(f"image shape must be three positive sizes (C, H, W), got {tuple(shape)}")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def _mlp(sizes: Sequence[int]) -> list[nn.Module]:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return layers


class MLPEncoder(nn.Sequential):
    """Flatten the image and apply an MLP.

    Args:
        in_shape: (C, H, W) of the input.
        out_dim: size of the output vector.
        hidden_dims: sizes of the hidden layers.
    """

    def __init__(self, in_shape: Sequence[int], out_dim: int, hidden_dims: Sequence[int] = (512, 256)) -> None:
        c, h, w = _check_shape(in_shape)
        super().__init__(nn.Flatten(), *_mlp([c * h * w, *hidden_dims, out_dim]))


class MLPDecoder(nn.Sequential):
    """An MLP whose output is reshaped to an image.

    Args:
        in_dim: size of the input vector.
        out_shape: (C, H, W) of the output.
        hidden_dims: sizes of the hidden layers (from the input side).
    """

    def __init__(self, in_dim: int, out_shape: Sequence[int], hidden_dims: Sequence[int] = (256, 512)) -> None:
        c, h, w = _check_shape(out_shape)
        super().__init__(*_mlp([in_dim, *hidden_dims, c * h * w]), nn.Unflatten(1, (c, h, w)))


def _check_channels(channels: Sequence[int]) -> None:
    if not channels or any(c <= 0 for c in channels):
        raise ValueError(f"conv nets need one or more positive channel sizes, got {list(channels)}")


def _downsampled_sizes(size: int, steps: int) -> list[int]:
    """Feature-map sizes after each stride-2 conv (kernel 3, padding 1): size, ceil(size/2), ..."""
    sizes = [size]
    for _ in range(steps):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


class ConvEncoder(nn.Module):
    """Stride-2 convolutions, one per entry of ``channels``, then a linear layer.

    Args:
        in_shape: (C, H, W) of the input.
        out_dim: size of the output vector.
        channels: output channels of each stride-2 convolution.
    """

    def __init__(self, in_shape: Sequence[int], out_dim: int, channels: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        c, h, w = _check_shape(in_shape)
        _check_channels(channels)
        layers: list[nn.Module] = []
        for n_in, n_out in zip([c, *channels[:-1]], channels, strict=True):
            layers += [nn.Conv2d(n_in, n_out, kernel_size=3, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        hs, ws = _downsampled_sizes(h, len(channels)), _downsampled_sizes(w, len(channels))
        self.head = nn.Linear(channels[-1] * hs[-1] * ws[-1], out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class ConvDecoder(nn.Module):
    """A linear layer to a small feature map, then stride-2 transposed convolutions back to (C, H, W).

    Args:
        in_dim: size of the input vector.
        out_shape: (C, H, W) of the output.
        channels: channels of the feature maps, from the smallest map upwards.
    """

    def __init__(self, in_dim: int, out_shape: Sequence[int], channels: Sequence[int] = (128, 64, 32)) -> None:
        super().__init__()
        c, h, w = _check_shape(out_shape)
        _check_channels(channels)
        # the sizes an encoder with the same depth would produce, reversed: (H_n, W_n) ... (H, W)
        self.sizes = list(zip(_downsampled_sizes(h, len(channels)), _downsampled_sizes(w, len(channels)), strict=True))[
            ::-1
        ]
        self.channels = list(channels)
        h0, w0 = self.sizes[0]
        self.head = nn.Linear(in_dim, channels[0] * h0 * w0)
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(n_in, n_out, kernel_size=3, stride=2, padding=1)
            for n_in, n_out in zip(channels, [*channels[1:], channels[-1]], strict=True)
        )
        self.out = nn.Conv2d(channels[-1], c, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h0, w0 = self.sizes[0]
        x = self.head(z).view(-1, self.channels[0], h0, w0)
        for up, size in zip(self.ups, self.sizes[1:], strict=True):
            # output_size picks the output padding that lands exactly on the encoder's size
            x = torch.nn.functional.leaky_relu(up(x, output_size=size), 0.2)
        return self.out(x)


def build_encoder(
    architecture: str, in_shape: Sequence[int], out_dim: int, hidden_dims: Sequence[int] | None
) -> nn.Module:
    """Default encoder for ``architecture`` ('mlp' or 'conv')."""
    if architecture == "mlp":
        return MLPEncoder(in_shape, out_dim, (512, 256) if hidden_dims is None else hidden_dims)
    if architecture == "conv":
        return ConvEncoder(in_shape, out_dim, (32, 64, 128) if hidden_dims is None else hidden_dims)
    raise ValueError(f"unknown architecture {architecture!r}; choose one of: mlp, conv")


def build_decoder(
    architecture: str, in_dim: int, out_shape: Sequence[int], hidden_dims: Sequence[int] | None
) -> nn.Module:
    """Default decoder for ``architecture``, mirroring ``build_encoder`` (hidden sizes reversed)."""
    if architecture == "mlp":
        return MLPDecoder(in_dim, out_shape, tuple(reversed((512, 256) if hidden_dims is None else hidden_dims)))
    if architecture == "conv":
        return ConvDecoder(in_dim, out_shape, tuple(reversed((32, 64, 128) if hidden_dims is None else hidden_dims)))
    raise ValueError(f"unknown architecture {architecture!r}; choose one of: mlp, conv")
