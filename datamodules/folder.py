"""Image folders and CelebA: too large to hold in memory, so images are decoded per sample by workers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2
from typing_extensions import override

from datamodules.base import DataSpec, SplitDataModule, split_indices


class ImageFiles(Dataset):
    """Images decoded from files, with optional labels: (image,) or (image, label) per item."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | None, transform: v2.Transform, channels: int):
        self.paths, self.labels, self.transform = list(paths), labels, transform
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        with Image.open(self.paths[index]) as image:
            image = self.transform(image.convert(self.mode))
        return (image,) if self.labels is None else (image, self.labels[index])


class ImageFolderDataModule(SplitDataModule):
    """Any folder of images, resized (and optionally center-cropped) to square ``image_size`` images.

    A folder with one subfolder per class (torchvision's ImageFolder layout) gives labels; a flat folder
    gives images alone. Splits are drawn by ``split_seed``.

    Args:
        data_dir: the folder.
        image_size: side of the square images produced.
        crop_size: center-crop the original to this square side before resizing (None: no crop; the
            resized image is center-cropped to a square).
        channels: 1 (grey) or 3 (RGB).
        batch_size: examples per training batch.
        eval_batch_size: examples per batch of validation, test and predict (see ``InMemoryImageDataModule``).
        val_fraction: share of the images held out for validation.
        test_fraction: share of the images held out for testing.
        value_range: (low, high) the pixel values are mapped to.
        split_seed: seed of the fixed split.
        num_workers: DataLoader worker processes decoding images.
    """

    def __init__(
        self,
        data_dir: str,
        *,
        image_size: int = 64,
        crop_size: int | None = None,
        channels: int = 3,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        value_range: tuple[float, float] = (0.0, 1.0),
        split_seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size <= 0 or (crop_size is not None and crop_size <= 0) or batch_size <= 0 or eval_batch_size <= 0:
            raise ValueError("image_size, crop_size, batch_size and eval_batch_size must be > 0")
        if len(value_range) != 2 or not value_range[0] < value_range[1]:
            raise ValueError(f"value_range must be (low, high) with low < high, got {tuple(value_range)}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.splits: dict[str, Dataset] = {}

    @property
    def classes(self) -> list[str]:
        """Class subfolder names; empty for a flat folder."""
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"{type(self).__name__}: the folder {self.data_dir} does not exist (data_dir)")
        has_subfolders = any(p.is_dir() for p in self.data_dir.iterdir())
        return find_classes(str(self.data_dir))[0] if has_subfolders else []

    @property
    def data_spec(self) -> DataSpec:
        size = self.hparams.image_size
        return DataSpec((self.hparams.channels, size, size), self.value_range, len(self.classes) or None)

    def transform(self) -> v2.Transform:
        low, high = self.value_range
        crop = [v2.CenterCrop(self.hparams.crop_size)] if self.hparams.crop_size else []
        size, channels = self.hparams.image_size, self.hparams.channels
        return v2.Compose(
            [
                v2.ToImage(),
                *crop,
                v2.Resize(size, antialias=True),
                v2.CenterCrop(size),
                v2.ToDtype(torch.float32, scale=True),
                # [0, 1] -> value_range, written as the normalisation (x - mean) / std
                v2.Normalize([-low / (high - low)] * channels, [1 / (high - low)] * channels),
            ]
        )

    def files(self) -> tuple[list[Path], list[int] | None]:
        """All image files, and their class indices for a folder of class subfolders."""
        classes = self.classes
        if classes:
            samples = make_dataset(str(self.data_dir), {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS)
            paths, labels = [Path(p) for p, _ in samples], [label for _, label in samples]
        else:
            paths = sorted(p for p in self.data_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
            labels = None
        if not paths:
            raise ValueError(
                f"{type(self).__name__}: no images ({', '.join(IMG_EXTENSIONS)}) in {self.data_dir}; "
                "it is empty or holds other files"
            )
        return paths, labels

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        paths, labels = self.files()
        dataset = ImageFiles(paths, labels, self.transform(), self.hparams.channels)
        fractions = {"val": self.hparams.val_fraction, "test": self.hparams.test_fraction}
        indices = split_indices(len(dataset), fractions, self.hparams.split_seed, type(self).__name__)
        self.splits = {split: Subset(dataset, idx) for split, idx in indices.items()}


class CelebADataModule(ImageFolderDataModule):
    """CelebA aligned faces, center-cropped to 148 pixels and resized to 64 by default; the official splits.

    Args:
        data_dir: a folder holding ``img_align_celeba/`` and ``list_eval_partition.txt``, directly or in
            ``celeba/`` (where torchvision's ``download`` puts them).
        download: fetch the files with torchvision when they are missing (from Google Drive; often rate-limited).
        Others: see ``ImageFolderDataModule``.

    References: Liu et al. 2015, arXiv:1411.7766.
    """

    def __init__(
        self,
        data_dir: str = "data",
        *,
        download: bool = False,
        image_size: int = 64,
        crop_size: int | None = 148,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        value_range: tuple[float, float] = (0.0, 1.0),
        num_workers: int = 2,
    ) -> None:
        super().__init__(
            data_dir,
            image_size=image_size,
            crop_size=crop_size,
            channels=3,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            value_range=value_range,
            num_workers=num_workers,
        )
        self.download = download

    def _root(self) -> Path | None:
        for folder in (self.data_dir, self.data_dir / "celeba"):
            if (folder / "img_align_celeba").is_dir() and (folder / "list_eval_partition.txt").is_file():
                return folder
        return None

    @property
    def classes(self) -> list[str]:
        return []

    @override
    def prepare_data(self) -> None:
        if self.download and self._root() is None:
            torchvision.datasets.CelebA(str(self.data_dir), split="all", download=True)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        root = self._root()
        if root is None:
            raise FileNotFoundError(
                f"{type(self).__name__}: expected img_align_celeba/ and list_eval_partition.txt in {self.data_dir} "
                f"or {self.data_dir / 'celeba'}; set data_dir, or download: true"
            )
        # list_eval_partition.txt: "<file> <0|1|2>" for train, val, test
        partition = dict(line.split() for line in (root / "list_eval_partition.txt").read_text().splitlines() if line)
        transform = self.transform()
        for split, code in (("train", "0"), ("val", "1"), ("test", "2")):
            paths = [root / "img_align_celeba" / name for name, part in sorted(partition.items()) if part == code]
            if not paths:
                raise ValueError(f"{type(self).__name__}: list_eval_partition.txt lists no {split} images")
            self.splits[split] = ImageFiles(paths, None, transform, channels=3)
