"""2D toy densities (two moons, 8 Gaussians, checkerboard, spirals) for flows and other density models."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from datamodules.base import DataSpec, SplitDataModule
from dgm_lightning.checks import check_positive

Density = Literal["two_moons", "8gaussians", "checkerboard", "spirals"]
DENSITIES = ("two_moons", "8gaussians", "checkerboard", "spirals")


def sample_toy2d(density: Density, n: int, generator: torch.Generator) -> Tensor:
    """n points (n, 2) from a named toy density, drawn with ``generator`` (so a seed fixes them).

    - ``two_moons``: two interleaved half circles (radius 1, Gaussian noise 0.1), centred and scaled by 2;
    - ``8gaussians``: equal mixture of 8 Gaussians (std 0.2) evenly spaced on a circle of radius 2;
    - ``checkerboard``: uniform on the 8 dark squares of a 4x4 board covering [-2, 2]^2;
    - ``spirals``: two interleaved Archimedean spirals reaching radius 3, Gaussian noise 0.1.

    All points lie in [-4, 4]^2 (the rare tail point beyond it is clipped).
    """
    if density not in DENSITIES:
        raise ValueError(f"unknown density {density!r}; choose one of: {', '.join(DENSITIES)}")

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator)

    side = (rand(n) < 0.5).float()[:, None]  # which moon / spiral arm
    if density == "two_moons":
        t = math.pi * rand(n)
        upper = torch.stack([t.cos(), t.sin()], 1)
        lower = torch.stack([1 - t.cos(), 0.5 - t.sin()], 1)
        points = side * upper + (1 - side) * lower + 0.1 * randn(n, 2)
        points = 2 * (points - torch.tensor([0.5, 0.25]))
    elif density == "8gaussians":
        angle = 2 * math.pi * torch.randint(0, 8, (n,), generator=generator) / 8
        points = 2 * torch.stack([angle.cos(), angle.sin()], 1) + 0.2 * randn(n, 2)
    elif density == "checkerboard":
        # a random column, then a row of the same colour: 8 of the 16 unit squares
        col = torch.randint(0, 4, (n,), generator=generator)
        row = 2 * torch.randint(0, 2, (n,), generator=generator) + col % 2
        points = torch.stack([col, row], 1).float() + rand(n, 2) - 2
    else:
        t = 3 * rand(n).sqrt()  # radius, denser towards the outside like the arc length
        angle = 1.5 * math.pi * t
        arm = torch.stack([t * angle.cos(), t * angle.sin()], 1)
        points = (2 * side - 1) * arm + 0.1 * randn(n, 2)
    return points.clamp(-4.0, 4.0)


class Toy2DDataModule(SplitDataModule):
    """Points of a 2D toy density: batches of (B, 2) tensors, no labels, values in (-4, 4).

    The train, validation and test sets are drawn independently from the density with seeds
    ``seed``, ``seed + 1`` and ``seed + 2``, so they are the same on every run.

    Args:
        density: ``two_moons``, ``8gaussians``, ``checkerboard`` or ``spirals`` (see ``sample_toy2d``).
        num_train, num_val, num_test: points in each split.
        batch_size: points per training batch.
        eval_batch_size: points per batch of validation, test and predict.
        seed: seed of the data.

    References: two moons as in scikit-learn's make_moons; 8 Gaussians, checkerboard and spirals as in
        FFJORD, Grathwohl et al. 2018, arXiv:1810.01367.
    """

    value_range = (-4.0, 4.0)

    def __init__(
        self,
        density: Density = "two_moons",
        *,
        num_train: int = 10000,
        num_val: int = 1000,
        num_test: int = 2000,
        batch_size: int = 256,
        eval_batch_size: int = 2000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if density not in DENSITIES:
            raise ValueError(f"unknown density {density!r}; choose one of: {', '.join(DENSITIES)}")
        check_positive(
            num_train=num_train,
            num_val=num_val,
            num_test=num_test,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
        )
        self.save_hyperparameters()
        self.density = density
        self.splits: dict[str, TensorDataset] = {}

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec((2,), self.value_range, None)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        sizes = {"train": self.hparams.num_train, "val": self.hparams.num_val, "test": self.hparams.num_test}
        for offset, (split, n) in enumerate(sizes.items()):
            generator = torch.Generator().manual_seed(self.hparams.seed + offset)
            self.splits[split] = TensorDataset(sample_toy2d(self.density, n, generator))

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
