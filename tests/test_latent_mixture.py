"""The post-hoc latent sampler: AE and VAE sample codes from a Gaussian mixture fitted to the training codes
(``latent_sampler="fitted_mixture"``), which ``callbacks.FitLatentMixture`` fits when training ends and saves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from callbacks import FitLatentMixture
from dgm_lightning import AE, GAN, VAE
from dgm_lightning.cli import main
from dgm_lightning.export import METADATA_FILE, export_sampler
from dgm_lightning.fitted_mixture import FittedMixture
from tests.helpers import PRINT_IMPORTS, assert_imported_the_tree_under_test, images, trainer, tree_under_test_env

IMAGES = dict(data_shape=(1, 8, 8), hidden_dims=[16])
CENTRES = torch.tensor([[-6.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


def clustered_codes(n_per_cluster: int = 200, spread: float = 0.1) -> torch.Tensor:
    """Codes (3 n, 2) around CENTRES, ``spread`` their standard deviation."""
    noise = torch.randn(3, n_per_cluster, 2, generator=torch.Generator().manual_seed(0))
    return (CENTRES[:, None] + spread * noise).flatten(0, 1)


def set_mixture(model: AE | VAE) -> FittedMixture:
    """Give the model a fitted mixture by hand: weights (0.2, 0.3, 0.5) on three Gaussians in 2D."""
    mixture = model.code_mixture
    mixture.weights = torch.tensor([0.2, 0.3, 0.5])
    mixture.means = CENTRES.clone()
    mixture.scale_tril = torch.tensor([[[1.0, 0.0], [0.5, 2.0]], [[0.3, 0.0], [0.0, 0.3]], [[2.0, 0.0], [-1.0, 1.0]]])
    return mixture


@pytest.mark.parametrize("family", [AE, VAE])
def test_samples_of_a_mixture_fitted_to_clustered_codes_are_the_decoder_at_codes_of_those_clusters(family):
    model = family(2, latent_sampler="fitted_mixture", **IMAGES).eval()
    model.code_mixture.fit(clustered_codes(), 3)
    torch.manual_seed(1)
    samples = model.sample(600)
    torch.manual_seed(1)
    codes = model.codes_from_noise(torch.randn(600, 3))
    torch.testing.assert_close(samples, model.decode(codes))
    nearest = torch.cdist(codes, CENTRES).min(1)
    assert nearest.values.max() < 0.6  # within 6 spreads of a centre, never between clusters
    shares = torch.bincount(nearest.indices, minlength=3) / 600
    torch.testing.assert_close(shares, torch.full((3,), 1 / 3), atol=0.06, rtol=0)


def test_codes_from_noise_pick_the_component_by_the_normal_cdf_of_the_first_coordinate():
    model = AE(2, latent_sampler="fitted_mixture", **IMAGES)
    mixture = set_mixture(model)
    # cumulative weights (0.2, 0.5, 1.0): CDF 0.1 picks component 0, 0.3 component 1, 0.6 and 0.99 component 2
    first = torch.special.ndtri(torch.tensor([0.1, 0.3, 0.6, 0.99]))
    rest = torch.tensor([[1.0, -1.0], [2.0, 0.5], [0.0, 1.0], [-1.0, 3.0]])
    codes = model.codes_from_noise(torch.cat([first[:, None], rest], dim=1))
    components = [0, 1, 2, 2]
    expected = torch.stack(
        [mixture.means[k] + mixture.scale_tril[k] @ r for k, r in zip(components, rest, strict=True)]
    )
    torch.testing.assert_close(codes, expected)


def test_sample_is_from_noise_at_its_scaled_noise_and_temperature_zero_is_the_median_components_mean():
    model = AE(2, latent_sampler="fitted_mixture", **IMAGES).eval()
    mixture = set_mixture(model)
    assert model.noise_shape == (3,)
    torch.manual_seed(2)
    samples = model.sample(5, temperature=0.7)
    torch.manual_seed(2)
    torch.testing.assert_close(samples, model.from_noise(0.7 * torch.randn(5, 3)))
    # the normal CDF of 0 is 0.5, which the second component's share (0.2, 0.5] holds
    torch.testing.assert_close(model.sample(2, temperature=0.0), model.decode(mixture.means[[1, 1]]))


def test_the_prior_sampler_is_unchanged_by_a_fitted_mixture():
    model = AE(2, **IMAGES).eval()
    set_mixture(model)
    assert model.noise_shape == (2,)
    noise = torch.randn(4, 2)
    torch.testing.assert_close(model.from_noise(noise), model.decode(model.latent_from_noise(noise)))


def test_sample_before_the_mixture_is_fitted_raises_naming_the_callback():
    model = VAE(2, latent_sampler="fitted_mixture", **IMAGES)
    with pytest.raises(RuntimeError, match=r"not fitted yet: train it with the callback callbacks\.FitLatentMixture"):
        model.sample(2)


def test_an_unknown_latent_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown latent_sampler 'gmm'; choose one of: prior, fitted_mixture"):
        AE(2, latent_sampler="gmm", **IMAGES)


def test_the_exported_sampler_of_a_fitted_model_is_its_from_noise(tmp_path):
    model = VAE(2, num_classes=3, latent_sampler="fitted_mixture", **IMAGES).eval()
    set_mixture(model)
    path = export_sampler(model, tmp_path)
    assert (tmp_path / METADATA_FILE).read_text().count('"noise_shape": [\n    3\n  ]') == 1
    noise, labels = torch.randn(7, 3), torch.arange(7) % 3
    torch.testing.assert_close(torch.export.load(path).module()(noise, labels), model.from_noise(noise, labels=labels))


class SamplesWhileTraining(Callback):
    """Draws samples at the end of each validation epoch, as ImageLogger does, and the decoder at the prior's codes
    of the same noise's last coordinates."""

    def __init__(self) -> None:
        self.drawn: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: AE) -> None:
        torch.manual_seed(3)
        samples = pl_module.sample(4)
        torch.manual_seed(3)
        prior_codes = pl_module.latent_from_noise(torch.randn(4, 3)[:, 1:])
        self.drawn.append((samples, pl_module.decode(prior_codes)))


def test_during_the_fit_before_the_mixture_is_fitted_samples_come_from_the_prior():
    model = AE(2, latent_sampler="fitted_mixture", **IMAGES)
    callback = SamplesWhileTraining()
    data = DataLoader(TensorDataset(images(16)), batch_size=8)
    trainer(max_epochs=1, callbacks=[callback]).fit(model, data, data)
    assert not model.code_mixture.fitted and len(callback.drawn) == 2  # the sanity check's and the epoch's
    for samples, expected in callback.drawn:
        torch.testing.assert_close(samples, expected)


def test_the_callback_fits_a_conditional_vae_to_the_codes_of_the_training_data_with_their_labels():
    model = VAE(2, num_classes=3, latent_sampler="fitted_mixture", **IMAGES)
    x, labels = images(60), torch.arange(60) % 3
    data = DataLoader(TensorDataset(x, labels), batch_size=16)
    fit = FitLatentMixture(4, max_codes=40, covariance="diag", seed=5)
    trainer(max_epochs=1, callbacks=[fit], limit_val_batches=0).fit(model, data)
    model.eval()
    with torch.no_grad():
        codes = model.encode(x[:40], labels=labels[:40])
    expected = FittedMixture(2).fit(codes, 4, covariance="diag", seed=5)
    assert model.code_mixture.num_components == 4
    for name in ("weights", "means", "scale_tril"):
        torch.testing.assert_close(getattr(model.code_mixture, name), getattr(expected, name))


def test_the_callback_encodes_the_batches_of_one_training_epoch_only():
    model = AE(2, **IMAGES)
    x = images(40)
    data = DataLoader(TensorDataset(x), batch_size=8)
    trainer(max_epochs=1, limit_train_batches=2, callbacks=[FitLatentMixture(3)], limit_val_batches=0).fit(model, data)
    with torch.no_grad():
        expected = FittedMixture(2).fit(model.eval().encode(x[:16]), 3)
    torch.testing.assert_close(model.code_mixture.means, expected.means)


def test_too_few_training_codes_for_the_components_are_refused_naming_the_setting():
    data = DataLoader(TensorDataset(images(8)), batch_size=8)
    fit = trainer(max_epochs=1, callbacks=[FitLatentMixture(10)], limit_val_batches=0)
    with pytest.raises(ValueError, match="8 training codes are too few to fit 10 Gaussians: lower num_components"):
        fit.fit(AE(2, **IMAGES), data)


def test_the_callback_refuses_a_model_without_a_code_mixture():
    gan = GAN(8, data_shape=(2,), architecture="mlp", hidden_dims=[16])
    with pytest.raises(TypeError, match="GAN has none: remove callbacks.FitLatentMixture"):
        FitLatentMixture().setup(trainer(), gan, "fit")


@pytest.mark.parametrize("setting", [dict(num_components=0), dict(max_codes=0), dict(covariance="spherical")])
def test_the_callback_refuses_bad_settings(setting):
    with pytest.raises(ValueError, match="num_components must|max_codes must|unknown covariance 'spherical'"):
        FitLatentMixture(**setting)


def test_last_checkpoint_of_a_command_line_run_holds_the_fitted_mixture_and_resumes(tmp_path):
    cli = main(["fit", "--config", "ae_mixture_digits", "--trainer.max_epochs", "2", *QUIET])
    (last,) = tmp_path.glob("runs/*/*/checkpoints/last.ckpt")
    loaded = AE.load_from_checkpoint(last, weights_only=True).eval()
    trained = cli.model.eval()
    assert loaded.latent_sampler == "fitted_mixture" and loaded.code_mixture.num_components == 10
    for name in ("weights", "means", "scale_tril"):
        torch.testing.assert_close(getattr(loaded.code_mixture, name), getattr(trained.code_mixture, name))
    torch.manual_seed(4)
    expected = trained.sample(8)
    torch.manual_seed(4)
    torch.testing.assert_close(loaded.sample(8), expected)
    # the re-saved last checkpoint is the end of training: a resumed run goes on with the next epoch
    resumed = main(["fit", "--config", "ae_mixture_digits", "--trainer.max_epochs", "3", "--ckpt_path", str(last)])
    assert resumed.trainer.current_epoch == 3
    assert resumed.trainer.global_step == cli.trainer.global_step + cli.trainer.num_training_batches


def test_a_checkpoint_written_before_the_mixture_existed_loads_unfitted(tmp_path):
    model = AE(2, **IMAGES)
    fit = trainer(max_steps=1, limit_val_batches=0)
    fit.fit(model, DataLoader(TensorDataset(images(8)), batch_size=8))
    fit.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "code_mixture" not in k}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = AE.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    assert not loaded.code_mixture.fitted
    vector = torch.nn.utils.parameters_to_vector
    torch.testing.assert_close(vector(loaded.parameters()), vector(model.parameters()))


DDP_SCRIPT = """
import torch

from dgm_lightning.cli import main

if __name__ == "__main__":
    torch.set_num_threads(1)
    cli = main(["fit", "--config", "ae_mixture_digits", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                "--trainer.devices", "2", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                "--trainer.logger", "false"])
    torch.save(dict(cli.model.code_mixture.state_dict()), f"mixture_rank{cli.trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_under_ddp_both_ranks_fit_the_same_mixture_to_all_training_codes_and_save_it(tmp_path):
    (tmp_path / "ddp_mixture.py").write_text(DDP_SCRIPT + PRINT_IMPORTS)
    result = subprocess.run(
        [sys.executable, "ddp_mixture.py"], cwd=tmp_path, env=tree_under_test_env(OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert_imported_the_tree_under_test(result.stdout, packages=("dgm_lightning", "callbacks"))
    assert "fitted 10 Gaussians to 1258 training codes" in result.stdout + result.stderr  # both halves of 1258
    ranks = [torch.load(tmp_path / f"mixture_rank{rank}.pt") for rank in (0, 1)]
    (last,) = Path(tmp_path).glob("runs/*/*/checkpoints/last.ckpt")
    saved = AE.load_from_checkpoint(last, weights_only=True).code_mixture.state_dict()
    for name in ("weights", "means", "scale_tril"):
        assert ranks[0][name].shape[0] == 10
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(saved[name], ranks[0][name], rtol=0, atol=0)
