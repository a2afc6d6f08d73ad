"""Sequence DataModules: lines of text, images read row by row, and windows of a CSV time series.

Every batch is ``(x, lengths)``: x padded to the batch's longest sequence, (B, T) token ids (padding id 0)
or (B, T, D) features (padding 0), and lengths (B,) the true lengths.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader
from typing_extensions import override

from datamodules.base import DataSpec, InMemoryImageDataModule, SplitDataModule, check_split_args, split_indices
from datamodules.digits import DigitsDataModule
from datamodules.mnist import FashionMNISTDataModule, MNISTDataModule
from dgm_lightning.checks import check_choice
from dgm_lightning.vocabulary import PAD, Level, Vocabulary, tokenize

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLE_CORPUS = DATA_DIR / "short_lines.txt"
SAMPLE_SERIES = DATA_DIR / "sines.csv"
IMAGE_DATASETS = ("digits", "mnist", "fashion_mnist")


def pad_batch(sequences: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Collate variable-length sequences (T_i, ...) into a padded (B, T, ...) batch and lengths (B,)."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    return pad_sequence(sequences, batch_first=True, padding_value=PAD), lengths


class SequenceDataModule(SplitDataModule):
    """Dataloaders over ``self.splits`` (lists of tensors), padded per batch. Subclasses fill the splits."""

    splits: dict[str, list[Tensor]]
    collate_fn = staticmethod(pad_batch)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if "predict" in self.splits else "test")


class TextLinesDataModule(SequenceDataModule):
    """A UTF-8 text file, one sequence per non-empty line, as token ids at the character or word level.

    The vocabulary (``vocabulary``) is built on the training split only; validation and test tokens it
    lacks become ``<unk>``. A model fitted on it stores the vocabulary in its checkpoint, and on later runs
    the model's vocabulary replaces this one (``set_vocabulary``), so ids always mean what the model learned.
    For ``predict``, every line of the file is one input (no split), so any file of lines can be decoded.

    Args:
        path: the text file; None: the small corpus shipped with the package (``datamodules/data/short_lines.txt``).
        level: ``char`` or ``word`` tokens.
        max_len: lines longer than this many tokens are cut to it.
        min_freq: tokens seen fewer times in the training split become ``<unk>``.
        max_vocab: keep at most this many of the most frequent tokens (specials not counted); None: all.
        batch_size, eval_batch_size, val_fraction, test_fraction, split_seed, num_workers: as for the image
            DataModules.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        level: Level = "char",
        max_len: int = 64,
        min_freq: int = 1,
        max_vocab: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 512,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_choice("level", level, Level)
        if max_len <= 0:
            raise ValueError(f"max_len must be > 0 tokens, got {max_len}")
        if min_freq < 1 or (max_vocab is not None and max_vocab < 1):
            raise ValueError(f"min_freq and max_vocab must be >= 1, got {min_freq} and {max_vocab}")
        check_split_args(type(self).__name__, batch_size, val_fraction, test_fraction, eval_batch_size)
        self.save_hyperparameters()
        self.path = Path(path) if path is not None else SAMPLE_CORPUS
        self.vocabulary: Vocabulary | None = None
        self._given_vocabulary = False
        self.lines: dict[str, list[list[str]]] = {}
        self.splits = {}

    @property
    def data_spec(self) -> DataSpec:
        if self.vocabulary is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its data_spec is known")
        return DataSpec((self.hparams.max_len, len(self.vocabulary)), (0.0, float(len(self.vocabulary) - 1)), None)

    def read_lines(self) -> list[list[str]]:
        """The file's non-empty lines, tokenized and cut to max_len."""
        name = type(self).__name__
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{name}: no text file at {self.path}; set path to a UTF-8 file, one sequence a line"
            )
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{name}: {self.path} is not UTF-8 text ({error})") from error
        tokenized = (tokenize(line, self.hparams.level) for line in text.splitlines())
        lines = [tokens[: self.hparams.max_len] for tokens in tokenized if tokens]
        if not lines:
            raise ValueError(f"{name}: {self.path} holds no text (no non-empty line)")
        return lines

    @override
    def setup(self, stage: str | None = None) -> None:
        lines = self.read_lines()
        if stage == "predict":
            self.lines = {"predict": lines}
        else:
            fractions = {"val": self.hparams.val_fraction, "test": self.hparams.test_fraction}
            indices = split_indices(len(lines), fractions, self.hparams.split_seed, type(self).__name__)
            self.lines = {split: [lines[i] for i in idx] for split, idx in indices.items()}
        if not self._given_vocabulary:
            source = self.lines.get("train", lines)
            self.vocabulary = Vocabulary.build(
                source, level=self.hparams.level, min_freq=self.hparams.min_freq, max_size=self.hparams.max_vocab
            )
        self._encode()

    def set_vocabulary(self, vocabulary: Vocabulary) -> None:
        """Encode with this vocabulary (a trained model's) from now on, instead of one built on the data."""
        if vocabulary.level != self.hparams.level:
            raise ValueError(
                f"the vocabulary is {vocabulary.level}-level but this DataModule reads {self.hparams.level}"
            )
        self.vocabulary, self._given_vocabulary = vocabulary, True
        self._encode()

    def _encode(self) -> None:
        self.splits = {
            split: [torch.tensor(self.vocabulary.encode(tokens), dtype=torch.long) for tokens in lines]
            for split, lines in self.lines.items()
        }

    @override
    def state_dict(self) -> dict[str, list[str]]:
        # saved in checkpoints beside the model's copy, so a resumed run keeps the same ids
        return {} if self.vocabulary is None else {"vocab": list(self.vocabulary.tokens)}

    @override
    def load_state_dict(self, state_dict: dict[str, list[str]]) -> None:
        if "vocab" in state_dict:
            self.set_vocabulary(Vocabulary(tuple(state_dict["vocab"]), self.hparams.level))


class SequentialImageDataModule(SequenceDataModule):
    """Images read row by row: each (1, H, W) image is a sequence of H steps of W values in [0, 1].

    Loading and splitting are those of ``DigitsDataModule``, ``MNISTDataModule`` or ``FashionMNISTDataModule``;
    labels are dropped.

    Args:
        dataset: ``digits`` (8x8, installed with scikit-learn), ``mnist`` or ``fashion_mnist`` (28x28).
        data_dir, download: where the MNIST-format files lie, and whether to fetch them (not for digits).
        batch_size, eval_batch_size, val_fraction, test_fraction, split_seed, num_workers: as for the image
            DataModules (MNIST-format data keep their official test set, so test_fraction is unused there).
    """

    def __init__(
        self,
        dataset: Literal["digits", "mnist", "fashion_mnist"] = "digits",
        *,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in IMAGE_DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(IMAGE_DATASETS)}")
        check_split_args(type(self).__name__, batch_size, val_fraction, test_fraction, eval_batch_size)
        self.save_hyperparameters()
        self.splits = {}
        self._images: InMemoryImageDataModule | None = None

    @property
    def images(self) -> InMemoryImageDataModule:
        """The image DataModule that loads and splits the data."""
        # built on first use, not in __init__: LightningCLI hands the hyperparameters it is instantiating to
        # every save_hyperparameters() call made meanwhile, so a DataModule built there would get ours
        if self._images is None:
            h = self.hparams
            if h.dataset == "digits":
                self._images = DigitsDataModule(
                    batch_size=h.batch_size, eval_batch_size=h.eval_batch_size, val_fraction=h.val_fraction,
                    test_fraction=h.test_fraction,
                    split_seed=h.split_seed,
                )  # fmt: skip
            else:
                cls = MNISTDataModule if h.dataset == "mnist" else FashionMNISTDataModule
                self._images = cls(
                    h.data_dir, download=h.download, batch_size=h.batch_size, eval_batch_size=h.eval_batch_size,
                    val_fraction=h.val_fraction,
                    split_seed=h.split_seed,
                )  # fmt: skip
        return self._images

    @property
    def data_spec(self) -> DataSpec:
        _, h, w = self.images.data_shape
        return DataSpec((h, w), (0.0, 1.0), None)

    @override
    def prepare_data(self) -> None:
        self.images.prepare_data()

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.images.setup(stage)
        # (N, 1, H, W) -> N sequences (H, W): rows are the time steps
        self.splits = {split: list(data.tensors[0][:, 0].unbind(0)) for split, data in self.images.splits.items()}


class CSVSequenceDataModule(SequenceDataModule):
    """A multivariate time series in a CSV file (a header row, then one time step per row), cut into windows.

    The rows are split in time order, the first for training, then validation, then test, so no window
    sees the future of another split; each split is cut into windows of ``window`` steps every ``stride``
    steps. With ``standardize`` every column is shifted and scaled by the training rows' mean and standard
    deviation (kept in ``mean`` and ``std`` to map samples back).

    Args:
        path: the CSV file; None: the sine waves shipped with the package (``datamodules/data/sines.csv``).
        columns: the columns to use (by header name); None: all.
        window: steps per sequence.
        stride: steps between window starts; None: ``window`` (no overlap).
        standardize: zero mean and unit variance per column, from the training rows.
        batch_size, eval_batch_size, val_fraction, test_fraction, num_workers: as for the other DataModules.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        columns: list[str] | None = None,
        window: int = 32,
        stride: int | None = None,
        standardize: bool = True,
        batch_size: int = 32,
        eval_batch_size: int = 512,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if window <= 0 or (stride is not None and stride <= 0):
            raise ValueError(f"window and stride must be > 0, got {window} and {stride}")
        check_split_args(type(self).__name__, batch_size, val_fraction, test_fraction, eval_batch_size)
        self.save_hyperparameters()
        self.path = Path(path) if path is not None else SAMPLE_SERIES
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.num_features: int | None = None
        self._range = (0.0, 1.0)
        self.splits = {}

    @property
    def data_spec(self) -> DataSpec:
        if self.mean is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its data_spec is known")
        value_range = (-math.inf, math.inf) if self.hparams.standardize else self._range
        return DataSpec((self.hparams.window, self.num_features), value_range, None)

    def read(self) -> Tensor:
        """The chosen columns as a float tensor (rows, columns)."""
        name = type(self).__name__
        if not self.path.is_file():
            raise FileNotFoundError(f"{name}: no CSV file at {self.path}")
        with self.path.open(newline="", encoding="utf-8") as file:
            rows = list(csv.reader(file))
        if len(rows) < 2:
            raise ValueError(f"{name}: {self.path} needs a header row and at least one row of values")
        header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
        wanted = self.hparams.columns or header
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ValueError(f"{name}: columns {missing} are not in {self.path}; its columns: {', '.join(header)}")
        picks = [header.index(c) for c in wanted]
        values = []
        for line, row in enumerate(body, start=2):
            try:
                values.append([float(row[i]) for i in picks])
            except (ValueError, IndexError) as error:
                raise ValueError(f"{name}: {self.path} line {line} is not numeric in the chosen columns") from error
        data = torch.tensor(values, dtype=torch.float32)
        if not torch.isfinite(data).all():
            raise ValueError(f"{name}: {self.path} holds NaN or infinite values")
        return data

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        data = self.read()
        self.num_features = data.shape[1]
        n, h = data.shape[0], self.hparams
        n_val, n_test = round(n * h.val_fraction), round(n * h.test_fraction)
        parts = {
            "train": data[: n - n_val - n_test],
            "val": data[n - n_val - n_test : n - n_test],
            "test": data[n - n_test :],
        }
        self.mean = parts["train"].mean(0) if h.standardize else torch.zeros(self.num_features)
        std = parts["train"].std(0) if h.standardize and len(parts["train"]) > 1 else torch.ones(self.num_features)
        self.std = torch.where(std > 0, std, torch.ones_like(std))  # a constant column stays as it is
        self._range = (float(data.min()), float(data.max())) if data.min() < data.max() else (0.0, 1.0)
        stride = h.stride or h.window
        for split, part in parts.items():
            if len(part) < h.window:
                raise ValueError(
                    f"{type(self).__name__}: the {split} split has {len(part)} rows, fewer than window={h.window}; "
                    "use a longer series, a shorter window or other fractions"
                )
            part = (part - self.mean) / self.std
            self.splits[split] = [part[s : s + h.window] for s in range(0, len(part) - h.window + 1, stride)]
