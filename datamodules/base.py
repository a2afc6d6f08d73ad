"""In-memory image DataModules: decode once into tensors, split by a fixed seed, check what they declare."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typing_extensions import override


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


def check_split_args(
    owner: str, batch_size: int, val_fraction: float, test_fraction: float, eval_batch_size: int
) -> None:
    """Raise a ValueError for a non-positive batch size or split fractions that leave no training data."""
    if batch_size <= 0 or eval_batch_size <= 0:
        raise ValueError(f"{owner}: batch_size and eval_batch_size must be > 0, got {batch_size} and {eval_batch_size}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"{owner}: val_fraction and test_fraction must be in (0, 1) with a sum below 1, "
            f"got {val_fraction} and {test_fraction}"
        )


def split_indices(n: int, fractions: dict[str, float], seed: int, owner: str) -> dict[str, list[int]]:
    """A fixed random split of range(n): the given fractions for the named splits, the rest for ``train``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = {split: round(n * fraction) for split, fraction in fractions.items()}
    sizes = {"train": n - sum(sizes.values()), **sizes}
    splits, start = {}, 0
    for split, size in sizes.items():
        if size <= 0:
            raise ValueError(
                f"{owner}: the {split} split is empty ({n} examples, fractions {fractions}); "
                "use more data or other fractions"
            )
        splits[split] = order[start : start + size]
        start += size
    return splits


class SplitDataModule(L.LightningDataModule):
    """Dataloaders over ``self.splits`` (train, val, test), filled by a subclass's ``setup``.

    The test split doubles as the predict split: models' ``predict_step`` reconstructs it and draws as
    many samples. Subclasses save ``batch_size``, ``eval_batch_size`` (the batches of validation, test and
    predict; ``batch_size`` where not saved) and optionally ``num_workers`` as hyperparameters and
    may set ``collate_fn`` (how examples form a batch; None: torch's default stacking).
    """

    splits: dict[str, Dataset]
    collate_fn: Callable | None = None

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.splits:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its {split} dataloader is requested")
        workers = self.hparams.get("num_workers", 0)
        batch_size = self.hparams.batch_size if split == "train" else self.eval_batch_size
        return DataLoader(
            self.splits[split], batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate_fn,
            num_workers=workers, persistent_workers=workers > 0,
        )  # fmt: skip

    @property
    def eval_batch_size(self) -> int:
        """The batch size of validation, test and predict."""
        return self.hparams.get("eval_batch_size", self.hparams.batch_size)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


class InMemoryImageDataModule(SplitDataModule):
    """Base for image datasets small enough to hold as tensors (no per-sample decoding while training).

    Subclasses set ``data_shape`` and ``num_classes`` and implement ``load()``. Batches are
    ``(images, labels)`` pairs, or images alone when the dataset has no labels.

    Args:
        batch_size: examples per training batch.
        eval_batch_size: examples per batch of validation, test and predict, where no gradients are kept: a larger
            batch is faster there (a VAE's IWAE bound bounds its memory with ``iwae_chunk_size``).
        val_fraction: share of the data held out for validation.
        test_fraction: share of the data held out for testing.
        value_range: (low, high) the pixel values are mapped to: (0, 1) or (-1, 1) for tanh generators.
        split_seed: seed of the fixed train/val/test split (independent of the training seed).
        binarize: binary pixels for likelihood benchmarks: training images are drawn anew as Bernoulli
            samples of their grey levels every time they are seen (dynamic binarization); validation and
            test images once, with a fixed seed. Needs value_range (0, 1).
        on_device: hold the tensors on the training device (the GPU), so that batches need no copy from
            the host; needs num_workers 0.
        num_workers: DataLoader workers; 0 is right for tensors already in memory.
    """

    data_shape: tuple[int, int, int]
    num_classes: int | None = None

    def __init__(
        self,
        *,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        value_range: Sequence[float] = (0.0, 1.0),
        split_seed: int = 0,
        binarize: bool = False,
        on_device: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_split_args(type(self).__name__, batch_size, val_fraction, test_fraction, eval_batch_size)
        if len(value_range) != 2 or not value_range[0] < value_range[1]:
            raise ValueError(f"value_range must be (low, high) with low < high, got {tuple(value_range)}")
        if on_device and num_workers:
            raise ValueError(
                "on_device keeps the data on the GPU, where worker processes cannot index it: num_workers 0"
            )
        if binarize and tuple(value_range) != (0.0, 1.0):
            raise ValueError(f"binarize needs value_range (0, 1), got {tuple(value_range)}")
        self.save_hyperparameters()
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.splits: dict[str, TensorDataset] = {}

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(tuple(self.data_shape), self.value_range, self.num_classes)

    def load(self) -> tuple[Tensor, Tensor | None]:
        """All images as a float tensor (N, C, H, W) with values in [0, 1], and labels (N,) or None.

        For a dataset with an official test set (see ``load_test``): its training images only.
        """
        raise NotImplementedError

    def load_test(self) -> tuple[Tensor, Tensor | None] | None:
        """The dataset's official test set, like ``load()``; None (the default) carves one out by test_fraction."""
        return None

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        test = self.load_test()
        fractions = {"val": self.hparams.val_fraction}
        if test is None:
            fractions["test"] = self.hparams.test_fraction
        self.splits = self._split(*self._prepare(*self.load()), fractions)
        if test is not None:
            self.splits["test"] = TensorDataset(*(t for t in self._prepare(*test) if t is not None))
        if self.hparams.binarize:
            # evaluation splits are binarized once, with a fixed seed, so that scores are comparable
            generator = torch.Generator().manual_seed(self.hparams.split_seed)
            for split in ("val", "test"):
                images, *labels = self.splits[split].tensors
                self.splits[split] = TensorDataset(torch.bernoulli(images, generator=generator), *labels)
        if self.hparams.on_device and self.trainer is not None:
            device = self.trainer.strategy.root_device  # this rank's device under DDP
            self.splits = {k: TensorDataset(*(t.to(device) for t in v.tensors)) for k, v in self.splits.items()}

    def _prepare(self, images: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Check what load() returned and map it to value_range."""
        self._check(images, labels)
        low, high = self.value_range
        return images * (high - low) + low, labels

    def _split(self, images: Tensor, labels: Tensor | None, fractions: dict[str, float]) -> dict[str, TensorDataset]:
        indices = split_indices(images.shape[0], fractions, self.hparams.split_seed, type(self).__name__)
        return {
            split: TensorDataset(images[idx]) if labels is None else TensorDataset(images[idx], labels[idx])
            for split, idx in indices.items()
        }

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # dynamic binarization: a fresh binary draw of every training image each time it is seen
        if self.hparams.binarize and self.trainer is not None and self.trainer.training:
            images, *labels = batch
            return [torch.bernoulli(images), *labels]
        return batch

    def _check(self, images: Tensor, labels: Tensor | None) -> None:
        name = type(self).__name__
        if images.shape[0] == 0:
            raise ValueError(f"{name}: the dataset is empty (no images were loaded)")
        if images.dim() != 4 or tuple(images.shape[1:]) != tuple(self.data_shape):
            raise ValueError(f"{name}: images have shape {tuple(images.shape)}, expected (N, {self.data_shape})")
        if not torch.isfinite(images).all():
            raise ValueError(f"{name}: the images contain NaN or Inf values")
        if images.min() < 0 or images.max() > 1:
            raise ValueError(f"{name}: load() must return values in [0, 1], got {images.min()}..{images.max()}")
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"{name}: expected one label per image, got labels of shape {tuple(labels.shape)}")
