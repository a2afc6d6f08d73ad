"""LightningDataModules that declare what they yield (``data_spec``)."""

from datamodules.base import DataSpec, InMemoryImageDataModule
from datamodules.cifar import CIFAR10DataModule
from datamodules.digits import DigitsDataModule
from datamodules.folder import CelebADataModule, ImageFolderDataModule
from datamodules.mnist import FashionMNISTDataModule, MNISTDataModule
from datamodules.sequences import CSVSequenceDataModule, SequentialImageDataModule, TextLinesDataModule
from datamodules.toy2d import Toy2DDataModule, sample_toy2d

__all__ = [
    "CIFAR10DataModule",
    "CSVSequenceDataModule",
    "CelebADataModule",
    "DataSpec",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "InMemoryImageDataModule",
    "MNISTDataModule",
    "SequentialImageDataModule",
    "TextLinesDataModule",
    "Toy2DDataModule",
    "sample_toy2d",
]
