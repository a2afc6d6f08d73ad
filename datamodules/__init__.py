"""LightningDataModules that declare what they yield (``data_spec``)."""

from datamodules.base import DataSpec, InMemoryImageDataModule
from datamodules.digits import DigitsDataModule
from datamodules.mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "DataSpec",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "InMemoryImageDataModule",
    "MNISTDataModule",
]
