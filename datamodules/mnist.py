"""MNIST and Fashion-MNIST, from torchvision's download or from a folder of the original IDX files."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import torch
import torchvision
from torch import Tensor
from typing_extensions import override

from datamodules.base import InMemoryImageDataModule

# the files as distributed; each may also lie uncompressed, as torchvision extracts them
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# what to do about a damaged file: a partial download or an interrupted copy or installation
REFETCH = (
    "delete it and fetch it again (download: true, --data.download true on the command line), or re-install "
    "it (Debian's Fashion-MNIST: apt-get install --reinstall dataset-fashion-mnist)"
)


def read_idx(path: Path) -> Tensor:
    """An IDX file (the MNIST format), gzipped or not, as a uint8 tensor.

    Written out because torchvision's reader opens only uncompressed files, while the files as
    distributed (and as Debian's dataset-fashion-mnist installs them) are gzipped.
    """
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        # a cut file ends the stream early (EOFError); a damaged one fails its header or checksum
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise ValueError(f"{path} is truncated or corrupt ({error}); {REFETCH}") from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad header); {REFETCH}")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim :]
    if len(body) != torch.Size(shape).numel():
        raise ValueError(f"{path} is truncated: header says {shape}, found {len(body)} bytes of data; {REFETCH}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(shape)


class MNISTDataModule(InMemoryImageDataModule):
    """MNIST digits, 28x28 grey levels, 10 classes; decoded once into memory.

    The official 10,000 test images are the test split; ``val_fraction`` of the 60,000 training images,
    chosen by ``split_seed``, are the validation split.

    Args:
        data_dir: a folder holding the four original files (``train-images-idx3-ubyte.gz``, ...,
            gzipped or not), or torchvision's layout (``<data_dir>/<dataset>/raw/``), where ``download``
            puts them.
        download: fetch the files with torchvision when they are missing.
        Others: see ``InMemoryImageDataModule``.

    References: LeCun et al. 1998.
    """

    data_shape = (1, 28, 28)
    num_classes = 10
    torchvision_dataset = torchvision.datasets.MNIST

    def __init__(
        self,
        data_dir: str = "data",
        *,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_fraction: float = 1 / 12,
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

    @property
    def search_dirs(self) -> list[Path]:
        return [self.data_dir, self.data_dir / self.torchvision_dataset.__name__ / "raw"]

    @override
    def prepare_data(self) -> None:
        if self.download and self._find("train") is None:
            for train in (True, False):
                self.torchvision_dataset(str(self.data_dir), train=train, download=True)

    def _find(self, split: str) -> tuple[Path, Path] | None:
        """The (images, labels) files of a split, in the first folder that has both."""
        for folder in self.search_dirs:
            found = [
                next((p for p in (folder / f"{name}.gz", folder / name) if p.is_file()), None) for name in FILES[split]
            ]
            if all(found):
                return found[0], found[1]
        return None

    def _read(self, split: str) -> tuple[Tensor, Tensor]:
        paths = self._find(split)
        if paths is None:
            names = ", ".join(f"{name}[.gz]" for pair in FILES.values() for name in pair)
            folders = " or ".join(str(f) for f in self.search_dirs)
            raise FileNotFoundError(
                f"{type(self).__name__}: the {split} files are missing; expected {names} in {folders}. "
                "Set data_dir to the folder holding them, "
                "or download: true to fetch them (for Fashion-MNIST on Debian: apt-get install dataset-fashion-mnist, "
                "then data_dir: /usr/share/datasets/fashion-mnist)"
            )
        images, labels = (read_idx(p) for p in paths)
        if images.shape[1:] != self.data_shape[1:] or labels.shape != images.shape[:1]:
            raise ValueError(f"{paths[0]}: {tuple(images.shape)} images with {tuple(labels.shape)} labels do not match")
        return images.unsqueeze(1).float() / 255.0, labels.long()

    def load(self) -> tuple[Tensor, Tensor]:
        return self._read("train")

    def load_test(self) -> tuple[Tensor, Tensor]:
        return self._read("test")


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST: Zalando's 28x28 grey-level clothing images, 10 classes. Args: see ``MNISTDataModule``.

    References: Xiao et al. 2017, arXiv:1708.07747.
    """

    torchvision_dataset = torchvision.datasets.FashionMNIST
