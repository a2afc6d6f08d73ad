"""2D data drawn as pictures: the model's density as a heat map beside histograms of samples and data."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torchvision.utils import make_grid


def is_2d(model: L.LightningModule) -> bool:
    """Whether the model generates 2D points (``data_shape`` (2,)), drawn as densities, not as images."""
    return tuple(getattr(model, "data_shape", ())) == (2,)


# viridis at five stops: a perceptually even map from low (dark violet) to high (yellow) density
_COLORMAP = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]) / 255.0


def colorize(values: Tensor) -> Tensor:
    """Values (H, W) in [0, 1] -> an RGB image (3, H, W) in [0, 1] through the viridis colormap."""
    position = values.clamp(0, 1) * (len(_COLORMAP) - 1)
    low = position.floor().long().clamp(max=len(_COLORMAP) - 2)
    frac = (position - low)[..., None]
    return (_COLORMAP[low] * (1 - frac) + _COLORMAP[low + 1] * frac).permute(2, 0, 1)


def histogram_image(points: Tensor, value_range: tuple[float, float], resolution: int) -> Tensor:
    """2D points (N, 2) -> their histogram on a resolution^2 grid over value_range^2, colorized (3, H, W).

    Rows run from high y (top) to low y, as in a plot; counts are shown on a square-root scale so that
    sparse regions stay visible.
    """
    low, high = value_range
    counts = torch.histogramdd(points.float().cpu(), bins=[resolution, resolution], range=[low, high, low, high])[0]
    counts = counts.T.flip(0).sqrt()  # [x, y] -> [row = -y, column = x]
    return colorize(counts / counts.max().clamp(min=1))


def density_panels(
    model: L.LightningModule, data: Tensor | None, value_range: tuple[float, float], num_points: int, resolution: int
) -> Tensor:
    """One uint8 image of 2D panels side by side: the density exp(log_prob) on a grid (for unconditional models
    with ``log_prob``), a histogram of ``num_points`` samples, and one of the data (when given)."""
    low, high = value_range
    panels = []
    # a conditional model's log_prob needs labels; its marginal density would need the class frequencies
    if hasattr(model, "log_prob") and getattr(model, "num_classes", None) is None:
        step = (high - low) / resolution
        centres = torch.linspace(low + step / 2, high - step / 2, resolution, device=model.device)
        ys, xs = torch.meshgrid(centres.flip(0), centres, indexing="ij")  # top row = highest y
        with torch.no_grad():  # log_prob is differentiable: no graph over the resolution^2 grid
            log_density = model.log_prob(torch.stack([xs, ys], -1).view(-1, 2)).view(resolution, resolution).cpu()
        log_density = torch.nan_to_num(log_density.float(), nan=-torch.inf)
        panels.append(colorize((log_density - log_density.max()).exp()))
    panels.append(histogram_image(model.sample(num_points), value_range, resolution))
    if data is not None:
        panels.append(histogram_image(data, value_range, resolution))
    grid = make_grid(torch.stack(panels), nrow=len(panels), padding=2, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8)
