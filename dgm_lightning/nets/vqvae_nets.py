"""The VQ-VAE's convolutional encoder to a grid of vectors and its decoder back: plain nn.Modules, no Lightning.

Each entry of ``channels`` is one stride-2 convolution (kernel 4), so the grid is the image downsampled
len(channels) times (28x28 -> 14x14 -> 7x7); residual blocks follow at the lowest resolution (van den Oord et al.
2017, arXiv:1711.00937, section 4.1). The decoder retraces the encoder's sizes exactly, odd ones included.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dgm_lightning.checks import check_positive_int


def grid_sizes(size: int, steps: int) -> list[int]:
    """Feature-map sizes after each stride-2 convolution (kernel 4, padding 1): size, size // 2, ..."""
    sizes = [size]
    for _ in range(steps):
        sizes.append(sizes[-1] // 2)
    if sizes[-1] < 1:
        raise ValueError(f"an image side of {size} cannot be halved {steps} times; use fewer hidden_dims")
    return sizes


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), the VQ-VAE paper's block."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class GridEncoder(nn.Module):
    """Images (B, C, H, W) -> a grid of vectors (B, out_channels, H / 2^n, W / 2^n).

    Args:
        in_channels: channels of the images.
        out_channels: size of each grid vector (the codebook's embedding_dim).
        channels: output channels of each stride-2 convolution (n = len(channels)).
        residual_blocks: residual blocks at the grid's resolution.
        residual_channels: hidden channels of each residual block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (64, 128),
        residual_blocks: int = 2,
        residual_channels: int = 32,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("the VQ-VAE encoder needs at least one stride-2 layer: give hidden_dims one or more sizes")
        check_positive_int(in_channels=in_channels, out_channels=out_channels, residual_channels=residual_channels)
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip([in_channels, *channels[:-1]], channels, strict=True)):
            layers += [nn.ReLU()] if i else []
            layers.append(nn.Conv2d(n_in, n_out, 4, stride=2, padding=1))
        layers += [ResidualBlock(channels[-1], residual_channels) for _ in range(residual_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(channels[-1], out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class GridDecoder(nn.Module):
    """A grid of vectors (B, in_channels, h, w) -> image parameters (B, C, H, W), mirroring ``GridEncoder``.

    Args:
        in_channels: size of each grid vector.
        out_shape: (C, H, W) of the images.
        channels: channels of the feature maps from the grid upwards (the encoder's, reversed).
        residual_blocks: residual blocks at the grid's resolution.
        residual_channels: hidden channels of each residual block.
    """

    def __init__(
        self,
        in_channels: int,
        out_shape: Sequence[int],
        channels: Sequence[int] = (128, 64),
        residual_blocks: int = 2,
        residual_channels: int = 32,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("the VQ-VAE decoder needs at least one stride-2 layer: give hidden_dims one or more sizes")
        c, h, w = (int(s) for s in out_shape)
        # the encoder's sizes, from the grid up to the image: (h_n, w_n), ..., (H, W)
        self.sizes = list(zip(grid_sizes(h, len(channels)), grid_sizes(w, len(channels)), strict=True))[::-1]
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, padding=1),
            *(ResidualBlock(channels[0], residual_channels) for _ in range(residual_blocks)),
            nn.ReLU(),
        )
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(n_in, n_out, 4, stride=2, padding=1)
            for n_in, n_out in zip(channels, [*channels[1:], c], strict=True)
        )

    def forward(self, z: Tensor) -> Tensor:
        x = self.head(z)
        for i, (up, size) in enumerate(zip(self.ups, self.sizes[1:], strict=True)):
            x = up(x, output_size=size)  # output_size picks the output padding that lands on the encoder's size
            if i < len(self.ups) - 1:
                x = nn.functional.relu(x)
        return x
