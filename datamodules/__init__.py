"""LightningDataModules that declare what they yield (``data_spec``)."""

from datamodules.base import DataSpec, InMemoryImageDataModule
from datamodules.digits import DigitsDataModule

__all__ = ["DataSpec", "DigitsDataModule", "InMemoryImageDataModule"]
