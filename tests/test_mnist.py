"""MNIST-class DataModules: the original IDX files (gzipped or not, flat or in torchvision's layout), splits, errors."""

from __future__ import annotations

import gzip
import re

import pytest
import torch

from datamodules import FashionMNISTDataModule, MNISTDataModule
from datamodules.mnist import read_idx
from tests.helpers import write_idx_files


def test_reads_the_gzipped_files_as_distributed(tmp_path):
    write_idx_files(tmp_path, n_train=24, n_test=8)
    dm = FashionMNISTDataModule(str(tmp_path), val_fraction=0.25, batch_size=4)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 18, "val": 6, "test": 8}
    assert dm.data_spec.data_shape == (1, 28, 28) and dm.data_spec.num_classes == 10
    test_images, test_labels = dm.splits["test"].tensors
    # the test split is the official t10k file, in file order
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    assert torch.equal(test_images, raw.unsqueeze(1).float() / 255) and test_labels.tolist() == list(range(8))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long


def test_uncompressed_files_in_torchvision_layout_and_value_range(tmp_path):
    write_idx_files(tmp_path / "MNIST" / "raw", gz=False)
    dm = MNISTDataModule(str(tmp_path), value_range=(-1.0, 1.0))
    dm.setup()
    images = torch.cat([dm.splits[s].tensors[0] for s in ("train", "val", "test")])
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.9 and images.max() > 0.9


def test_missing_files_name_what_was_expected_and_where(tmp_path):
    dm = FashionMNISTDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\[.gz\].*nowhere.*FashionMNIST/raw.*download"):
        dm.setup()


def test_a_truncated_file_is_reported(tmp_path):
    write_idx_files(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
    with pytest.raises(ValueError, match="truncated.*delete it and fetch it again"):
        MNISTDataModule(str(tmp_path)).setup()


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
def test_a_cut_gzip_file_is_named_with_how_to_get_it_again(tmp_path, name):
    # an interrupted download or copy: the compressed stream ends early (gzip's bare EOFError before)
    write_idx_files(tmp_path)
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    expected = rf"{re.escape(str(path))}.*truncated or corrupt.*download: true.*apt-get install --reinstall"
    with pytest.raises(ValueError, match=expected):
        FashionMNISTDataModule(str(tmp_path)).setup()


def test_a_damaged_gzip_file_is_named(tmp_path):
    write_idx_files(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the CRC of the uncompressed data no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*truncated or corrupt.*--reinstall"):
        MNISTDataModule(str(tmp_path)).setup()


def test_dynamic_binarization_draws_new_binary_images_each_time(tmp_path):
    write_idx_files(tmp_path, n_train=64, n_test=16)
    dm = MNISTDataModule(str(tmp_path), binarize=True, batch_size=64)
    dm.setup()
    assert set(dm.splits["test"].tensors[0].unique().tolist()) == {0.0, 1.0}  # fixed binarization

    class Training:  # stands in for a Trainer in the training loop
        training = True

    dm.trainer = Training()
    batch = dm.splits["train"].tensors[0][:32], torch.zeros(32)
    first, second = dm.on_after_batch_transfer(batch, 0)[0], dm.on_after_batch_transfer(batch, 0)[0]
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    # the draws follow the grey levels: the mean of many draws approaches them
    mean = torch.stack([dm.on_after_batch_transfer(batch, 0)[0] for _ in range(400)]).mean(0)
    assert (mean - batch[0]).abs().max() < 0.15
    with pytest.raises(ValueError, match="binarize needs value_range"):
        MNISTDataModule(str(tmp_path), binarize=True, value_range=(-1.0, 1.0))


@pytest.mark.skipif(
    not (p := __import__("pathlib").Path("/usr/share/datasets/fashion-mnist")).is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_the_debian_fashion_mnist_files():
    dm = FashionMNISTDataModule(str(p))
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 55000, "val": 5000, "test": 10000}
