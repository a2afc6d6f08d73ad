"""In-memory image DataModules: decode once into tensors, split by a fixed seed, check what they declare."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class DataSpec:
    """What a DataModule yields; models compare it with their own settings in ``setup``.

    Args:
        data_shape: shape of one example: (C, H, W) for images, (D,) for vectors.
        value_range: (low, high) of pixel values.
        num_classes: number of label classes, None when the data has no labels.
    """

    data_shape: tuple[int, ...]
    value_range: tuple[float, float]
    num_classes: int | None


class InMemoryImageDataModule(L.LightningDataModule):
    """Base for image datasets small enough to hold as tensors (no per-sample decoding while training).

    Subclasses set ``img_shape`` and ``num_classes`` and implement ``load()``. Batches are
    ``(images, labels)`` pairs, or images alone when the dataset has no labels.

    Args:
        batch_size: examples per batch.
        val_fraction: share of the data held out for validation.
        test_fraction: share of the data held out for testing.
        value_range: (low, high) the pixel values are mapped to: (0, 1) or (-1, 1) for tanh generators.
        split_seed: seed of the fixed train/val/test split (independent of the training seed).
        num_workers: DataLoader workers; 0 is right for tensors already in memory.
    """

    img_shape: tuple[int, int, int]
    num_classes: int | None = None

    def __init__(
        self,
        *,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        value_range: Sequence[float] = (0.0, 1.0),
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                "val_fraction and test_fraction must be in (0, 1) with a sum below 1, "
                f"got {val_fraction} and {test_fraction}"
            )
        if len(value_range) != 2 or not value_range[0] < value_range[1]:
            raise ValueError(f"value_range must be (low, high) with low < high, got {tuple(value_range)}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.splits: dict[str, TensorDataset] = {}

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(tuple(self.img_shape), self.value_range, self.num_classes)

    def load(self) -> tuple[Tensor, Tensor | None]:
        """All images as a float tensor (N, C, H, W) with values in [0, 1], and labels (N,) or None."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        images, labels = self.load()
        self._check(images, labels)
        low, high = self.value_range
        images = images * (high - low) + low
        n = images.shape[0]
        n_val, n_test = round(n * self.hparams.val_fraction), round(n * self.hparams.test_fraction)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.split_seed))
        bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
        for split, (start, stop) in bounds.items():
            idx = order[start:stop]
            if len(idx) == 0:
                raise ValueError(
                    f"{type(self).__name__}: the {split} split is empty ({n} examples, val_fraction="
                    f"{self.hparams.val_fraction}, test_fraction={self.hparams.test_fraction}); "
                    "use more data or other fractions"
                )
            tensors = (images[idx],) if labels is None else (images[idx], labels[idx])
            self.splits[split] = TensorDataset(*tensors)

    def _check(self, images: Tensor, labels: Tensor | None) -> None:
        name = type(self).__name__
        if images.shape[0] == 0:
            raise ValueError(f"{name}: the dataset is empty (no images were loaded)")
        if images.dim() != 4 or tuple(images.shape[1:]) != tuple(self.img_shape):
            raise ValueError(f"{name}: images have shape {tuple(images.shape)}, expected (N, {self.img_shape})")
        if not torch.isfinite(images).all():
            raise ValueError(f"{name}: the images contain NaN or Inf values")
        if images.min() < 0 or images.max() > 1:
            raise ValueError(f"{name}: load() must return values in [0, 1], got {images.min()}..{images.max()}")
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"{name}: expected one label per image, got labels of shape {tuple(labels.shape)}")

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if not self.splits:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        workers = self.hparams.num_workers
        return DataLoader(
            self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
            num_workers=workers, persistent_workers=workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        # models' predict_step reconstructs these and draws as many samples
        return self._loader("test")
