"""LightningDataModules that declare what they yield (``data_spec``)."""

from datamodules.base import DataSpec, InMemoryImageDataModule
from datamodules.cifar import CIFAR10DataModule
from datamodules.digits import DigitsDataModule
from datamodules.folder import CelebADataModule, ImageFolderDataModule
from datamodules.mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "CelebADataModule",
    "DataSpec",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "InMemoryImageDataModule",
    "MNISTDataModule",
]
