"""In-memory image DataModules: the digits splits, what they declare, and the checks on loaded data."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from datamodules import DataSpec, DigitsDataModule, InMemoryImageDataModule, MNISTDataModule
from dgm_lightning import VAE
from tests.helpers import images, trainer, write_idx_files

N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm


def _rows(dm: InMemoryImageDataModule, split: str) -> set[tuple[float, ...]]:
    return {tuple(row.tolist()) for row in dm.splits[split].tensors[0].flatten(1)}


# -- DigitsDataModule ----------------------------------------------------------------------------


def test_digits_split_sizes(digits):
    n_val, n_test = round(N_DIGITS * 0.1), round(N_DIGITS * 0.2)
    sizes = {split: len(ds) for split, ds in digits.splits.items()}
    assert sizes == {"train": N_DIGITS - n_val - n_test, "val": n_val, "test": n_test}
    assert sizes == {"train": 1258, "val": 180, "test": 359}
    assert sum(sizes.values()) == N_DIGITS


def test_digits_splits_are_disjoint_and_cover_the_data(digits):
    train, val, test = (_rows(digits, s) for s in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    # no two digits images are identical, so the rows identify the examples
    assert len(train) + len(val) + len(test) == N_DIGITS
    all_images, _ = DigitsDataModule().load()
    assert train | val | test == {tuple(r.tolist()) for r in all_images.flatten(1)}


def test_digits_labels_follow_their_images(digits):
    all_images, all_labels = DigitsDataModule().load()
    label_of = {tuple(r.tolist()): int(y) for r, y in zip(all_images.flatten(1), all_labels, strict=True)}
    for split in ("train", "val", "test"):
        x, y = digits.splits[split].tensors
        assert [label_of[tuple(r.tolist())] for r in x.flatten(1)] == y.tolist()


def test_digits_split_is_fixed_by_split_seed(digits):
    same = DigitsDataModule()
    same.setup("fit")
    other = DigitsDataModule(split_seed=1)
    other.setup("fit")
    for split in ("train", "val", "test"):
        assert torch.equal(same.splits[split].tensors[0], digits.splits[split].tensors[0])
        assert torch.equal(same.splits[split].tensors[1], digits.splits[split].tensors[1])
    assert len(other.splits["val"]) == len(digits.splits["val"])
    assert _rows(other, "val") != _rows(digits, "val")
    assert _rows(other, "train") != _rows(digits, "train")


def test_digits_split_does_not_depend_on_global_seed(digits):
    torch.manual_seed(1234)
    dm = DigitsDataModule()
    dm.setup("fit")
    assert torch.equal(dm.splits["test"].tensors[0], digits.splits["test"].tensors[0])


def test_digits_data_spec(digits):
    assert digits.data_spec == DataSpec((1, 8, 8), (0.0, 1.0), 10)


def test_digits_values_in_unit_interval(digits):
    x = torch.cat([digits.splits[s].tensors[0] for s in ("train", "val", "test")])
    assert x.dtype == torch.float32
    assert x.min() == 0.0 and x.max() == 1.0


def test_digits_value_range_minus_one_one():
    dm = DigitsDataModule(value_range=(-1, 1))
    dm.setup("fit")
    x = torch.cat([dm.splits[s].tensors[0] for s in ("train", "val", "test")])
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() < -0.9 and x.max() > 0.9
    assert dm.data_spec.value_range == (-1.0, 1.0)
    assert dm.data_spec == DataSpec((1, 8, 8), (-1.0, 1.0), 10)


def test_digits_train_batch(digits):
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.long
    assert 0 <= int(y.min()) and int(y.max()) <= 9


def test_digits_loaders_cover_their_splits():
    dm = DigitsDataModule(batch_size=100)
    dm.setup("fit")
    assert sum(len(x) for x, _ in dm.val_dataloader()) == 180
    assert sum(len(x) for x, _ in dm.test_dataloader()) == 359
    assert sum(len(x) for x, _ in dm.predict_dataloader()) == 359
    assert [len(x) for x, _ in dm.train_dataloader()] == [100] * 12 + [58]


def test_dataloader_before_setup_raises():
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


# -- argument checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-4), "batch_size"),
        (dict(val_fraction=0.5, test_fraction=0.5), "sum below 1"),
        (dict(val_fraction=0.7, test_fraction=0.6), "sum below 1"),
        (dict(val_fraction=-0.1), "val_fraction"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(value_range=(1, 0)), "value_range"),
        (dict(value_range=(0.5, 0.5)), "value_range"),
        (dict(value_range=(0, 1, 2)), "value_range"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


# -- checks on what load() returns ---------------------------------------------------------------


class Loaded(InMemoryImageDataModule):
    """A DataModule serving whatever tensors it is given."""

    data_shape = (1, 8, 8)

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._x, self._y = x, y

    def load(self):
        return self._x, self._y


def test_unlabelled_data_module_works():
    dm = Loaded(images(20))
    dm.setup("fit")
    assert {s: len(d) for s, d in dm.splits.items()} == {"train": 14, "val": 2, "test": 4}
    assert dm.data_spec == DataSpec((1, 8, 8), (0.0, 1.0), None)
    (batch,) = next(iter(dm.train_dataloader()))
    assert batch.shape == (14, 1, 8, 8)


def test_empty_dataset_raises():
    with pytest.raises(ValueError, match="empty"):
        Loaded(torch.zeros(0, 1, 8, 8)).setup("fit")


def test_nan_images_raise():
    x = images(20)
    x[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Loaded(x).setup("fit")


def test_inf_images_raise():
    x = images(20)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        Loaded(x).setup("fit")


@pytest.mark.parametrize("bad", [1.5, -0.25])
def test_values_outside_unit_interval_raise(bad):
    x = images(20)
    x[5, 0, 1, 1] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Loaded(x).setup("fit")


def test_wrong_image_shape_raises():
    with pytest.raises(ValueError, match="shape"):
        Loaded(images(20, shape=(1, 7, 8))).setup("fit")


def test_wrong_label_count_raises():
    with pytest.raises(ValueError, match="one label per image"):
        Loaded(images(20), torch.zeros(19, dtype=torch.long)).setup("fit")


def test_too_few_examples_names_the_empty_split():
    # 3 images: round(0.3) = 0 validation examples
    with pytest.raises(ValueError, match="the val split is empty"):
        Loaded(images(3)).setup("fit")


def test_empty_test_split_named():
    # 4 images, test_fraction 0.1: round(0.4) = 0 test examples
    with pytest.raises(ValueError, match="the test split is empty"):
        Loaded(images(4), val_fraction=0.25, test_fraction=0.1).setup("fit")


def test_setup_is_idempotent():
    dm = Loaded(images(20))
    dm.setup("fit")
    first = dm.splits["train"]
    dm.setup("test")
    assert dm.splits["train"] is first


def test_on_device_moves_every_split_to_the_trainers_device():
    from types import SimpleNamespace

    dm = DigitsDataModule(on_device=True)
    # a stand-in Trainer whose device is "meta", so that the move is visible without a GPU
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    dm.setup()
    assert all(t.device.type == "meta" for split in dm.splits.values() for t in split.tensors)
    with pytest.raises(ValueError, match="num_workers 0"):
        DigitsDataModule(on_device=True, num_workers=2)


# -- binarization of the evaluation splits --------------------------------------------------------


class ValidationBatches(Callback):
    """Records the images of every validation batch the model receives, per epoch (sanity check left out)."""

    def __init__(self) -> None:
        self.epochs: list[list[torch.Tensor]] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.epochs.append([])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.epochs[-1].append(batch[0].clone())


def image_data(kind: str, folder, *, binarize: bool = True, split_seed: int = 0) -> InMemoryImageDataModule:
    """The digits, or MNIST from the files in folder; set up."""
    if kind == "digits":
        dm = DigitsDataModule(binarize=binarize, batch_size=128, split_seed=split_seed)
    else:
        dm = MNISTDataModule(str(folder), binarize=binarize, batch_size=128, val_fraction=0.25, split_seed=split_seed)
    dm.setup()
    return dm


@pytest.mark.parametrize("kind", ["digits", "mnist"])
def test_binarized_evaluation_splits_are_drawn_once_with_the_split_seed(kind, tmp_path):
    write_idx_files(tmp_path, n_train=64, n_test=32)
    dm = image_data(kind, tmp_path)
    recorder = ValidationBatches()
    model = VAE(latent_dim=2, data_shape=dm.data_shape, hidden_dims=[8])
    trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=2, callbacks=[recorder]).fit(model, datamodule=dm)
    # what the model is validated on: binary, and the same images in every epoch
    first, second = (torch.cat(batches) for batches in recorder.epochs)
    assert set(first.unique().tolist()) == {0.0, 1.0} and torch.equal(first, second)
    torch.manual_seed(1234)  # another global seed
    again, grey = image_data(kind, tmp_path), image_data(kind, tmp_path, binarize=False)
    for split in ("val", "test"):
        images = dm.splits[split].tensors[0]
        assert set(images.unique().tolist()) == {0.0, 1.0}, split
        # another instance draws the same binary images
        assert torch.equal(images, again.splits[split].tensors[0]), split
        # Bernoulli draws of the grey levels: on average as bright as the grey images, pixel by pixel correlated
        levels = grey.splits[split].tensors[0]
        assert abs(images.mean() - levels.mean()) < 0.05, split
        assert torch.corrcoef(torch.stack([images.flatten(), levels.flatten()]))[0, 1] > 0.4, split
    # the seed is the split's: another split_seed gives other draws (for MNIST, of the same official test images)
    other = image_data(kind, tmp_path, split_seed=1)
    assert not torch.equal(other.splits["test"].tensors[0], dm.splits["test"].tensors[0])
