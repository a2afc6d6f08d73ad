"""CIFAR-10 from torchvision's download or from a folder of the original python pickle batches."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torchvision
from torch import Tensor
from typing_extensions import override

from datamodules.base import InMemoryImageDataModule

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


def read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One pickled CIFAR batch as uint8 images (N, 3, 32, 32) and labels (N,).

    Read here rather than by torchvision's CIFAR10, which refuses any file whose md5 differs from the
    published one (so also any subset or copy made for tests).
    """
    with open(path, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
        # a cut file ends the pickle early: EOFError, or UnpicklingError("pickle data was truncated")
        except (EOFError, pickle.UnpicklingError) as error:
            raise ValueError(
                f"{path} is truncated or corrupt ({error}); delete it and fetch it again "
                "(download: true, --data.download true on the command line)"
            ) from error
    data, labels = batch[b"data"], batch[b"labels"]
    return torch.as_tensor(data, dtype=torch.uint8).view(-1, 3, 32, 32), torch.as_tensor(labels, dtype=torch.long)


class CIFAR10DataModule(InMemoryImageDataModule):
    """CIFAR-10: 32x32 colour images of 10 classes, decoded once into memory.

    The official 10,000 test images are the test split; ``val_fraction`` of the 50,000 training images,
    chosen by ``split_seed``, are the validation split.

    Args:
        data_dir: a folder holding ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (the python
            version as distributed), directly or in ``cifar-10-batches-py/``, where ``download`` puts them.
        download: fetch the files with torchvision when they are missing.
        Others: see ``InMemoryImageDataModule``.

    References: Krizhevsky 2009, "Learning multiple layers of features from tiny images".
    """

    data_shape = (3, 32, 32)
    num_classes = 10

    def __init__(
        self,
        data_dir: str = "data",
        *,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_fraction: float = 0.1,
        value_range: tuple[float, float] = (0.0, 1.0),
        split_seed: int = 0,
        binarize: bool = False,
        on_device: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            val_fraction=val_fraction,
            value_range=value_range,
            split_seed=split_seed,
            binarize=binarize,
            on_device=on_device,
            num_workers=num_workers,
        )
        self.data_dir = Path(data_dir)
        self.download = download

    def _folder(self) -> Path | None:
        for folder in (self.data_dir, self.data_dir / "cifar-10-batches-py"):
            if all((folder / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)):
                return folder
        return None

    @override
    def prepare_data(self) -> None:
        if self.download and self._folder() is None:
            torchvision.datasets.CIFAR10(str(self.data_dir), download=True)

    def _read(self, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        folder = self._folder()
        if folder is None:
            raise FileNotFoundError(
                f"{type(self).__name__}: expected {', '.join((*TRAIN_BATCHES, TEST_BATCH))} in {self.data_dir} "
                f"or {self.data_dir / 'cifar-10-batches-py'}. Set data_dir to the folder holding them, "
                "or download: true to fetch them"
            )
        images, labels = zip(*(read_cifar_batch(folder / name) for name in names), strict=True)
        return torch.cat(images).float() / 255.0, torch.cat(labels)

    def load(self) -> tuple[Tensor, Tensor]:
        return self._read(TRAIN_BATCHES)

    def load_test(self) -> tuple[Tensor, Tensor]:
        return self._read((TEST_BATCH,))
