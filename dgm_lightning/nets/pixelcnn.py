"""A gated PixelCNN over a grid of discrete codes: logits of each position given those before it in raster order.

Vertical and horizontal stacks (van den Oord et al. 2016, arXiv:1606.05328), so that the receptive field has no
blind spot: the vertical stack at row i sees rows <= i and reaches the horizontal stack shifted down one row (rows
< i); the horizontal stack sees the positions left of (i, j) in its row, (i, j) itself only from the second layer
on, after the first layer has excluded it. Causality is enforced by padding and shifting, not by masked weights,
so no weight is ever zeroed and the optimizer's state stays meaningful. A plain nn.Module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dgm_lightning.checks import check_positive_int


def shift_down(x: Tensor) -> Tensor:
    """(B, C, H, W) moved down one row, a zero row on top: row i then holds row i - 1."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def shift_right(x: Tensor) -> Tensor:
    """(B, C, H, W) moved right one column, a zero column on the left."""
    return F.pad(x, (1, 0))[:, :, :, :-1]


class GatedLayer(nn.Module):
    """One gated layer: tanh(a) * sigmoid(b) on each stack, the vertical stack feeding the horizontal one.

    Args:
        channels: channels of both stacks.
        kernel_size: odd width k of the layer's view; the vertical stack looks k // 2 rows up.
        first: the first layer, whose horizontal stack excludes the position itself and has no residual.
    """

    def __init__(self, channels: int, kernel_size: int, first: bool) -> None:
        super().__init__()
        self.first, self.half = first, kernel_size // 2
        self.vertical = nn.Conv2d(channels, 2 * channels, (self.half + 1, kernel_size))
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, self.half + 1))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, v: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        k = self.half
        v_features = self.vertical(F.pad(v, (k, k, k, 0)))  # rows i - k .. i, columns j - k .. j + k
        h_input = shift_right(h) if self.first else h  # the first layer must not see position (i, j)
        h_features = self.horizontal(F.pad(h_input, (k, 0)))  # columns j - k .. j of row i
        h_features = h_features + self.vertical_to_horizontal(shift_down(v_features))  # rows < i only
        v_out = gate(v_features)
        h_out = self.out(gate(h_features))
        return v_out, h_out if self.first else h + h_out


def gate(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedPixelCNN(nn.Module):
    """Code grid (B, H, W) of indices in [0, num_codes) -> logits (B, num_codes, H, W), each position's logits a
    function of the positions before it in raster order only (the first position's of nothing: a learned marginal).

    Args:
        num_codes: number of distinct codes (the VQ-VAE's codebook size).
        channels: channels of the stacks.
        num_layers: gated layers; the receptive field reaches num_layers * (kernel_size // 2) rows up.
        kernel_size: odd width of each layer's view.

    References: van den Oord et al. 2016, arXiv:1606.05328 (gated PixelCNN).
    """

    # the logits of the first rows are the same for a grid cut after them (nothing looks down or depends on the
    # height): sampling row i runs the network on rows 0..i only, half the work of whole grids on average
    rows_suffice: bool = True

    def __init__(self, num_codes: int, channels: int = 64, num_layers: int = 6, kernel_size: int = 3) -> None:
        super().__init__()
        check_positive_int(num_codes=num_codes, channels=channels, num_layers=num_layers, kernel_size=kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"the PixelCNN's kernel_size must be odd (3, 5, ...), got {kernel_size}")
        self.num_codes = num_codes
        self.embedding = nn.Embedding(num_codes, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, kernel_size, first=i == 0) for i in range(num_layers))
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, num_codes, 1)
        )

    def forward(self, codes: Tensor) -> Tensor:
        x = self.embedding(codes).permute(0, 3, 1, 2)  # (B, channels, H, W)
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h)
        return self.head(h)
