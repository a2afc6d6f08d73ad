"""Defaults a new user meets (issue 18): the AE's sampling Gaussian without validation data, sampling temperature,
damaged data files, the progress bar."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from datamodules import CIFAR10DataModule, DigitsDataModule, SequentialImageDataModule
from dgm_lightning import AE, GAN, VAE, Classifier, Flow, FlowVAE, RecurrentVAE
from tests.helpers import trainer, write_cifar

REPO = Path(__file__).resolve().parent.parent


class FrozenEncoder(nn.Module):
    """Codes far from 0 (means about -6 and -2, standard deviations about 0.5, correlated) that training cannot
    move: a fixed linear map of the pixels, so the codes of the training data are known after training."""

    def __init__(self, in_features: int = 64) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 2)
        with torch.no_grad():
            weight = torch.randn(2, in_features, generator=torch.Generator().manual_seed(0)) * 0.15
            weight[1] += 0.5 * weight[0]
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(torch.tensor([-6.0, -2.0]) - weight @ torch.full((in_features,), 0.3))
        self.linear.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def frozen_ae() -> AE:
    return AE(latent_dim=2, data_shape=(1, 8, 8), hidden_dims=[16], encoder=FrozenEncoder())


# -- point 3: an AE trained without validation data --------------------------------------------------


@pytest.mark.parametrize("no_validation", ["no val loader", "limit_val_batches 0"])
def test_an_ae_fitted_without_validation_samples_from_a_gaussian_fitted_to_its_training_codes(no_validation, tmp_path):
    digits = DigitsDataModule(batch_size=128)
    digits.setup()
    model = frozen_ae()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    if no_validation == "no val loader":
        fit = trainer(max_epochs=2, enable_checkpointing=True, callbacks=[checkpoint])
        fit.fit(model, train_dataloaders=digits.train_dataloader())
    else:
        fit = trainer(max_epochs=2, enable_checkpointing=True, callbacks=[checkpoint], limit_val_batches=0)
        fit.fit(model, datamodule=digits)
    with torch.no_grad():
        codes = model.encode(digits.splits["train"].tensors[0])
    assert codes.mean(0).abs().min() > 1.5 and codes.std(0).max() < 1  # far from N(0, I)
    # the Gaussian is fitted to every training code of the epoch
    torch.testing.assert_close(model.code_mean, codes.mean(0), atol=1e-4, rtol=0)
    cov = model.code_scale_tril @ model.code_scale_tril.T
    torch.testing.assert_close(cov, torch.cov(codes.T) + 1e-4 * torch.eye(2), atol=1e-4, rtol=0)
    # so the codes that sample draws lie where the data's codes lie
    latents = model.latent_from_noise(torch.randn(20000, 2))
    torch.testing.assert_close(latents.mean(0), codes.mean(0), atol=0.03, rtol=0)
    torch.testing.assert_close(latents.std(0), codes.std(0), atol=0.03, rtol=0)
    # and the fit is in the checkpoint written at the end of the epoch
    restored = AE.load_from_checkpoint(tmp_path / "last.ckpt", encoder=FrozenEncoder(), weights_only=True)
    assert torch.equal(restored.code_mean, model.code_mean)
    assert torch.equal(restored.code_scale_tril, model.code_scale_tril)


@pytest.mark.parametrize("sanity_steps", [2, 0])  # without a sanity check, validation first runs after epoch 0
def test_with_validation_data_the_ae_keeps_the_fit_to_the_validation_codes(sanity_steps):
    digits = DigitsDataModule(batch_size=128)
    digits.setup()
    model = frozen_ae()
    trainer(max_epochs=1, num_sanity_val_steps=sanity_steps).fit(model, datamodule=digits)
    with torch.no_grad():
        codes = model.encode(digits.splits["val"].tensors[0])
    torch.testing.assert_close(model.code_mean, codes.mean(0), atol=1e-5, rtol=0)


DDP_SCRIPT = """
import torch
import lightning as L
from torch.utils.data import DataLoader, TensorDataset

from tests.test_defaults import frozen_ae

if __name__ == "__main__":
    torch.set_num_threads(1)
    L.seed_everything(0)
    # even examples dark, odd ones bright: without shuffling, rank 0 gets the even ones and rank 1 the odd ones,
    # so each rank's own codes lie far from the codes of all the data
    images = torch.rand(64, 1, 8, 8) * 0.2 + (torch.arange(64) % 2).view(-1, 1, 1, 1) * 0.6
    torch.save(images, "images.pt")
    model = frozen_ae()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(images), batch_size=8, shuffle=False))
    torch.save({"mean": model.code_mean, "scale_tril": model.code_scale_tril}, f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_under_ddp_the_training_codes_of_every_rank_make_one_fit(tmp_path):
    (tmp_path / "ddp_ae.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "ddp_ae.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        codes = FrozenEncoder()(torch.load(tmp_path / "images.pt"))
    expected_cov = torch.cov(codes.T) + 1e-4 * torch.eye(2)
    for rank in (0, 1):
        fit = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(fit["mean"], codes.mean(0), atol=1e-4, rtol=0)
        torch.testing.assert_close(fit["scale_tril"] @ fit["scale_tril"].T, expected_cov, atol=1e-4, rtol=0)


# -- point 16: sample's temperature ----------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.5, 2.0])
def test_vae_sample_scales_the_prior_noise_by_the_temperature(temperature):
    model = VAE(latent_dim=3, data_shape=(1, 8, 8), hidden_dims=[16], likelihood="gaussian").eval()
    # a prior other than N(0, I), so that its mean and scale both show in the hand computation
    model.prior_loc.copy_(torch.tensor([0.5, -1.0, 2.0]))
    model.prior_scale.copy_(torch.tensor([1.0, 0.5, 2.0]))
    torch.manual_seed(3)
    samples = model.sample(64, temperature=temperature)
    torch.manual_seed(3)
    z = model.prior_loc + temperature * model.prior_scale * torch.randn(64, 3)
    with torch.no_grad():
        expected = model.decoder(z)  # the Gaussian likelihood's mean: the decoder's output
    torch.testing.assert_close(samples, expected)
    # the latents themselves: spread by temperature times the prior's scale around the prior's mean
    latents = model.latent_from_noise(temperature * torch.randn(20000, 3))
    torch.testing.assert_close(latents.mean(0), model.prior_loc, atol=0.05 * max(temperature, 0.1), rtol=0)
    torch.testing.assert_close(latents.std(0), temperature * model.prior_scale, atol=0.03 * temperature, rtol=0.03)


def test_sampling_at_temperature_zero_decodes_the_prior_mean_and_the_ae_code_mean():
    vae = VAE(latent_dim=3, data_shape=(1, 8, 8), hidden_dims=[16]).eval()
    vae.prior_loc.copy_(torch.tensor([0.5, -1.0, 2.0]))
    with torch.no_grad():
        mode = torch.sigmoid(vae.decoder(vae.prior_loc[None]))  # the Bernoulli mean of the decoder's logits
    torch.testing.assert_close(vae.sample(5, temperature=0.0), mode.expand(5, -1, -1, -1))
    ae = AE(latent_dim=3, data_shape=(1, 8, 8), hidden_dims=[16]).eval()
    ae.fit_code_gaussian(torch.tensor([3.0, -4.0, 1.0]), 0.25 * torch.eye(3))
    with torch.no_grad():
        mode = torch.sigmoid(ae.decoder(ae.code_mean[None]))
    torch.testing.assert_close(ae.sample(5, temperature=0.0), mode.expand(5, -1, -1, -1))
    latents = ae.latent_from_noise(2.0 * torch.randn(20000, 3))
    torch.testing.assert_close(latents.std(0), torch.full((3,), 2.0 * 0.5), atol=0.03, rtol=0)


# -- point 8: damaged data files ----------------------------------------------------------------------


def test_a_cut_cifar_batch_is_named_with_how_to_get_it_again(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*truncated or corrupt.*download: true"):
        CIFAR10DataModule(str(tmp_path)).setup()


# -- point 14: the progress bar shows the main objective ------------------------------------------------

DIGITS = dict(data_shape=(1, 8, 8), hidden_dims=[8])
FAMILIES = {  # a tiny model of every family, its data, and the terms its progress bar shows
    "AE": (lambda: AE(latent_dim=2, **DIGITS), "digits", ("loss",)),
    "VAE": (lambda: VAE(latent_dim=2, **DIGITS), "digits", ("loss",)),
    "FlowVAE": (lambda: FlowVAE(latent_dim=2, num_flows=1, **DIGITS), "digits", ("loss",)),
    "GAN": (
        lambda: GAN(4, data_shape=(1, 8, 8), value_range=(-1.0, 1.0), architecture="mlp", hidden_dims=[8]),
        "digits (-1, 1)",
        ("d_loss", "g_loss"),
    ),
    "Flow": (
        lambda: Flow("realnvp", data_shape=(1, 8, 8), num_steps=1, hidden_dims=(4, 4), quantization_levels=17),
        "digits",
        ("nll",),
    ),
    "RecurrentVAE": (
        lambda: RecurrentVAE(2, likelihood="bernoulli", hidden_dims=[8], embedding_dim=4),
        "rows",
        ("loss",),
    ),
    "Classifier": (lambda: Classifier(10, data_shape=(1, 8, 8), feature_dim=4, hidden_dims=(4,)), "digits", ("loss",)),
}


def family_data(kind: str):
    if kind == "rows":
        return SequentialImageDataModule("digits", batch_size=64)
    return DigitsDataModule(batch_size=64, value_range=(-1.0, 1.0) if "(-1, 1)" in kind else (0.0, 1.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_progress_bar_shows_the_familys_main_objective(family):
    build, data, main_terms = FAMILIES[family]
    model = build()
    fit = trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1,
                  enable_progress_bar=True)  # fmt: skip
    fit.fit(model, datamodule=family_data(data))
    shown = fit.progress_bar_callback.get_metrics(fit, model)  # what the bar displays
    expected = {f"{stage}/{term}{suffix}" for term in main_terms for stage, suffix in
                (("train", "_step"), ("train", ""), ("val", ""))}  # fmt: skip
    assert set(shown) == expected, family  # the main objective and nothing else (no logger: no v_num)
    for key in expected:
        assert shown[key] == pytest.approx(fit.logged_metrics[key].item()), key
