"""ImageLogger: which grids it draws, their layout, PNG files and what loggers receive."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks import ImageLogger
from dgm_lightning import VAE
from tests.helpers import images, read_image, trainer


class RecordingLogger(CSVLogger):
    """A CSV logger that also takes images, as W&B's does, and records the calls."""

    def __init__(self, save_dir) -> None:
        super().__init__(save_dir)
        self.images: list[dict] = []

    def log_image(self, **kwargs) -> None:
        self.images.append(kwargs)


def test_grids_are_saved_as_pngs_and_handed_to_loggers_that_take_images(tmp_path):
    model = VAE(latent_dim=3, data_shape=(1, 8, 8), hidden_dims=[16])
    logger = RecordingLogger(tmp_path)
    steps = 5
    callback = ImageLogger(num_samples=16, num_reconstructions=4, num_interpolations=2, interpolation_steps=steps)
    loader = DataLoader(TensorDataset(images(16)), batch_size=8)
    trainer(max_epochs=1, logger=logger, callbacks=[callback]).fit(model, loader, loader)
    folder = tmp_path / "lightning_logs" / "version_0" / "images"
    kinds = {"samples", "reconstructions", "interpolations", "traversals"}
    assert {p.parent.name for p in folder.glob("*/epoch_0000.png")} == kinds
    assert {call["key"] for call in logger.images} == {f"val/{kind}" for kind in kinds}
    # no explicit step: W&B files images under the step of the scalars logged last
    assert all("step" not in call for call in logger.images)
    # 8x8 images are drawn 4x larger (32 px) with 2 px of padding: traversals have a row per latent dimension
    traversals = read_image(folder / "traversals" / "epoch_0000.png")
    assert traversals.shape == (1, 3 * 34 + 2, steps * 34 + 2)
    interpolations = read_image(folder / "interpolations" / "epoch_0000.png")
    assert interpolations.shape == (1, 2 * 34 + 2, steps * 34 + 2)


def test_traversals_sweep_one_latent_dimension_per_row():
    model = VAE(latent_dim=4, data_shape=(1, 8, 8), hidden_dims=[16])
    callback = ImageLogger(num_traversal_dims=2, interpolation_steps=3)
    decoded = []
    model.decode = lambda z, labels=None: decoded.append(z) or torch.zeros(len(z), 1, 8, 8)
    x = images(1)
    callback._traverse(model, x, None)
    (z,) = decoded
    code = model.encode(x)[0]
    assert z.shape == (2 * 3, 4)
    assert torch.equal(z[:3, 0], torch.tensor([-3.0, 0.0, 3.0])) and torch.allclose(z[:3, 1:], code[1:].expand(3, 3))
    assert torch.equal(z[3:, 1], torch.tensor([-3.0, 0.0, 3.0])) and torch.allclose(z[3:, 0], code[0].expand(3))


def test_drawing_does_not_change_training(tmp_path):
    """The callback draws its own fixed noise, so a run with it trains exactly as a run without it."""
    loader = DataLoader(TensorDataset(images(32)), batch_size=8)

    def fit(callbacks) -> VAE:
        L.seed_everything(0, verbose=False)
        model = VAE(latent_dim=3, data_shape=(1, 8, 8), hidden_dims=[16])
        trainer(max_epochs=2, default_root_dir=tmp_path, callbacks=callbacks).fit(model, loader, loader)
        return model

    with_images, without = fit([ImageLogger(num_samples=4)]), fit([])
    assert all(torch.equal(a, b) for a, b in zip(with_images.parameters(), without.parameters(), strict=True))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="num_samples must be > 0"):
        ImageLogger(num_samples=0)
    with pytest.raises(ValueError, match="num_traversal_dims must be >= 0"):
        ImageLogger(num_traversal_dims=-1)


def test_image_logger_on_a_model_that_does_not_sample_says_so():
    from datamodules import DigitsDataModule
    from dgm_lightning import Classifier

    with pytest.raises(TypeError, match="Classifier has no sample"):
        trainer(max_epochs=1, callbacks=[ImageLogger()]).fit(Classifier(data_shape=(1, 8, 8)), DigitsDataModule())
