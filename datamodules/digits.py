"""scikit-learn's 8x8 handwritten digits: installed with scikit-learn, so it works offline."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import Tensor

from datamodules.base import InMemoryImageDataModule


class DigitsDataModule(InMemoryImageDataModule):
    """The 1797 8x8 grey-level digits of scikit-learn, as (1, 8, 8) images with labels 0-9.

    Pixel levels 0..16 are scaled to [0, 1], then to ``value_range``. The train/val/test split
    (by default 70/10/20 %) is fixed by ``split_seed``. Args: see ``InMemoryImageDataModule``.

    References: Alpaydin & Kaynak 1998, UCI optical recognition of handwritten digits.
    """

    data_shape = (1, 8, 8)
    num_classes = 10

    def load(self) -> tuple[Tensor, Tensor]:
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        return images, torch.as_tensor(digits.target, dtype=torch.long)
