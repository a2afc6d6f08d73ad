"""2D toy densities: fixed by the seed, the right shapes, each density's signature; the 2D density panels."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torchvision.io import read_image

from callbacks import ImageLogger
from datamodules import Toy2DDataModule, sample_toy2d
from datamodules.toy2d import DENSITIES
from dgm_lightning import VAE, Flow
from dgm_lightning.nets.flow_layers import ActNorm, FlowSequential
from tests.helpers import trainer


def draw(density: str, n: int = 4000, seed: int = 0) -> torch.Tensor:
    return sample_toy2d(density, n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("density", DENSITIES)
def test_every_density_is_fixed_by_its_seed_and_lies_in_the_declared_range(density):
    points = draw(density)
    assert points.shape == (4000, 2) and points.dtype == torch.float32
    assert torch.equal(points, draw(density)) and not torch.equal(points, draw(density, seed=1))
    assert points.abs().max() <= 4.0
    assert points.std(0).min() > 0.5  # spread out, not collapsed to a point


def test_each_density_has_its_shape():
    gaussians = draw("8gaussians")
    centres = 2 * torch.tensor([[math.cos(a), math.sin(a)] for a in torch.arange(8) * 2 * math.pi / 8])
    nearest = torch.cdist(gaussians, centres).min(1)
    assert nearest.values.mean() < 0.3 and len(nearest.indices.unique()) == 8
    board = draw("checkerboard")
    cells = (board + 2).floor().long()  # dark squares: column + row even
    assert board.abs().max() <= 2 and ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    moons = draw("two_moons")
    assert (moons[:, 1] > 0.5).float().mean() > 0.3 and (moons[:, 1] < -0.5).float().mean() > 0.3
    spirals = draw("spirals")
    assert 2.5 < spirals.norm(dim=1).max() < 3.5


def test_datamodule_splits_batches_and_spec():
    data = Toy2DDataModule("spirals", num_train=300, num_val=50, num_test=70, batch_size=128, seed=3)
    assert data.data_spec.data_shape == (2,) and data.data_spec.num_classes is None
    data.setup()
    (batch,) = next(iter(data.train_dataloader()))
    assert batch.shape == (128, 2)
    sizes = {split: len(ds) for split, ds in data.splits.items()}
    assert sizes == {"train": 300, "val": 50, "test": 70}
    assert not torch.equal(data.splits["val"].tensors[0][:50], data.splits["train"].tensors[0][:50])
    again = Toy2DDataModule("spirals", num_train=300, num_val=50, num_test=70, seed=3)
    again.setup()
    assert torch.equal(again.splits["test"].tensors[0], data.splits["test"].tensors[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"density": "swissroll"}, "choose one of: two_moons, 8gaussians, checkerboard, spirals"),
     ({"num_train": 0}, "num_train must be > 0")],
)  # fmt: skip
def test_bad_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Toy2DDataModule(**kwargs)


def test_image_logger_draws_the_density_beside_samples_and_data_for_2d_models(tmp_path):
    """A Gaussian flow (one ActNorm): its heat map peaks in the centre; the data panel shows the 8 Gaussians."""
    data = Toy2DDataModule("8gaussians", num_train=256, num_val=512, num_test=64, batch_size=128)
    model = Flow(data_shape=(2,), value_range=(-4.0, 4.0), quantization_levels=None, preprocessing="none",
                 flow=FlowSequential(ActNorm(2)))  # fmt: skip
    logger = CSVLogger(tmp_path, name="toy", version="v0")
    t = trainer(
        max_epochs=1, limit_train_batches=1, logger=logger, callbacks=[ImageLogger(num_points=512, resolution=32)]
    )
    t.fit(model, datamodule=data)
    image = read_image(str(tmp_path / "toy" / "v0" / "images" / "density" / "epoch_0000.png"))
    assert image.shape == (3, 32 + 4, 3 * 32 + 4 * 2)  # three panels, 2 px padding
    density, samples, points = (image[:, 2:34, 2 + i * 34 : 34 + i * 34].float().sum(0) for i in range(3))
    assert density[16, 16] > density[2, 2] + 200  # bright (yellow) centre, dark corner
    assert samples[12:20, 12:20].mean() > samples[:4, :4].mean()  # N(0, I) samples fill the centre
    assert points[12:20, 12:20].mean() < points[7:10, 14:18].mean()  # the data avoid the centre (ring of radius 2)


def test_image_models_still_get_image_grids_not_density_panels():
    logger = ImageLogger(num_samples=4, num_reconstructions=2, num_interpolations=1, interpolation_steps=3)
    logger._inputs = (torch.rand(2, 1, 8, 8), None)
    with torch.no_grad():
        grids = logger.grids(VAE(latent_dim=2, data_shape=(1, 8, 8), hidden_dims=[8]))
    assert set(grids) == {"samples", "reconstructions", "interpolations", "traversals"}
    assert grids["samples"].shape == (1, 2 * 34 + 2, 2 * 34 + 2)  # 8x8 enlarged to 32x32, 2 px padding
