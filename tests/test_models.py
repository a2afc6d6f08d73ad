"""AE and VAE: shapes, learning, likelihood estimates, conditioning, injected nets, checkpoints, bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from datamodules import DigitsDataModule
from dgm_lightning import AE, VAE
from tests.helpers import images, trainer

DIGITS = dict(data_shape=(1, 8, 8), hidden_dims=[32])


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=64, eval_batch_size=100)  # predict batches of 100
    dm.setup()
    return dm


@pytest.mark.parametrize(
    "model_cls, kwargs",
    [
        (AE, {}),
        (AE, {"architecture": "conv", "hidden_dims": [8, 16], "num_classes": 10}),
        (VAE, {"likelihood": "bernoulli"}),
        (VAE, {"likelihood": "continuous_bernoulli", "architecture": "conv", "hidden_dims": [8, 16]}),
        (VAE, {"likelihood": "gaussian", "free_bits": 0.5}),
        (VAE, {"likelihood": "gaussian_learned", "num_classes": 10, "beta": 4.0}),
    ],
    ids=["ae", "ae-conv-conditional", "vae", "vae-cb-conv", "vae-gauss-freebits", "vae-learned-conditional"],
)
def test_every_variant_trains_tests_predicts_with_the_right_shapes(model_cls, kwargs, digits):
    model = model_cls(latent_dim=4, **{**DIGITS, **kwargs})
    t = trainer(fast_dev_run=True)
    t.fit(model, datamodule=digits)
    (metrics,) = t.test(model, datamodule=digits, verbose=False)
    assert all(math.isfinite(v) for v in metrics.values())
    if model_cls is VAE:
        assert {"test/elbo", "test/kl", "test/mi", "test/nll", "test/bpd", "test/reconstruction"} <= set(metrics)
        assert metrics["test/kl"] >= 0
        assert metrics["test/bpd"] == pytest.approx(metrics["test/nll"] / (64 * math.log(2)), rel=1e-5)
    (batch,) = t.predict(model, datamodule=digits)
    assert batch["samples"].shape == batch["reconstructions"].shape == batch["inputs"].shape == (100, 1, 8, 8)
    labels = torch.arange(5) if model.num_classes else None
    assert model.sample(5, labels=labels).shape == (5, 1, 8, 8)
    assert model.encode(images(3), labels=None if labels is None else labels[:3]).shape == (3, 4)


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian", "gaussian_learned"])
def test_every_parameter_receives_a_gradient(likelihood):
    model = VAE(latent_dim=3, num_classes=4, likelihood=likelihood, **DIGITS)
    model.objective((images(8), torch.arange(8) % 4)).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("model_cls", [AE, VAE])
def test_loss_falls_on_a_fixed_batch(model_cls, digits):
    model = model_cls(latent_dim=4, **DIGITS)
    x = digits.splits["train"].tensors[0][:32]
    optimizer = model.configure_optimizers()["optimizer"]
    first = model.objective(x).loss.item()
    for _ in range(150):
        optimizer.zero_grad()
        model.objective(x).loss.backward()
        optimizer.step()
    last = model.objective(x).loss.item()
    assert last < first - 3.0, (first, last)


def test_vae_test_elbo_improves_clearly_over_initialisation(digits):
    model = VAE(latent_dim=8, data_shape=(1, 8, 8), hidden_dims=[128])
    t = trainer(max_epochs=8)
    (before,) = t.test(model, datamodule=digits, verbose=False)
    t.fit(model, datamodule=digits)
    (after,) = t.test(model, datamodule=digits, verbose=False)
    # seen: about -45 nats at initialisation and -28 after 8 epochs
    assert after["test/elbo"] > before["test/elbo"] + 10
    assert after["test/nll"] <= -after["test/elbo"] + 0.5  # the IWAE bound is at least as tight as the ELBO


def test_iwae_estimate_matches_the_exact_marginal_likelihood_of_a_1d_latent_model():
    """With one latent dimension, log p(x) = log ∫ p(x|z) p(z) dz is computable by quadrature."""
    torch.manual_seed(0)
    model = VAE(latent_dim=1, data_shape=(1, 2, 2), hidden_dims=[8], likelihood="gaussian", gaussian_scale=0.5).double()
    x = torch.rand(4, 1, 2, 2, dtype=torch.float64)
    z = torch.linspace(-10, 10, 20001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        p_x_given_z = model.decoder_distribution(z, None)  # batch (20001,)
        log_px_z = torch.stack([p_x_given_z.log_prob(xi.expand(len(z), -1, -1, -1)) for xi in x])  # (4, 20001)
    log_joint = log_px_z + model.prior.log_prob(z).squeeze(1)
    exact = torch.logsumexp(log_joint, dim=1) + math.log(z[1, 0] - z[0, 0])
    estimate = model.log_prob(x, num_samples=20000)
    assert torch.allclose(estimate, exact, atol=0.02), (estimate, exact)
    assert (model.log_prob(x, num_samples=1) <= exact + 1e-6).float().mean() > 0  # a stochastic lower bound


def test_conditional_vae_uses_its_labels(digits):
    model = VAE(latent_dim=2, num_classes=10, data_shape=(1, 8, 8), hidden_dims=[128])
    trainer(max_epochs=10).fit(model, datamodule=digits)
    x, y = next(iter(digits.test_dataloader()))
    right = model.log_prob(x, labels=y, num_samples=16).mean()
    wrong = model.log_prob(x, labels=(y + 1) % 10, num_samples=16).mean()
    # seen: about 6 nats per image in favour of the true labels
    assert right > wrong + 2, (right, wrong)
    with pytest.raises(ValueError, match="must lie in"):
        model.sample(2, labels=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="pass labels"):
        model.reconstruct(x)


def test_ae_samples_from_a_gaussian_fitted_to_validation_codes(digits, tmp_path):
    model = AE(latent_dim=3, **DIGITS)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint]).fit(model, datamodule=digits)
    with torch.no_grad():
        codes = torch.cat([model.encode(x) for x, _ in digits.val_dataloader()])
    assert torch.allclose(model.code_mean, codes.mean(0), atol=1e-5)
    cov = model.code_scale_tril @ model.code_scale_tril.T
    assert torch.allclose(cov, torch.cov(codes.T) + 1e-4 * torch.eye(3), atol=1e-4)
    restored = AE.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert torch.equal(restored.code_mean, model.code_mean)


def test_vae_checkpoint_loads_in_a_fresh_model_with_weights_only(digits, tmp_path):
    model = VAE(latent_dim=3, beta=0.5, **DIGITS)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint]).fit(model, datamodule=digits)
    restored = VAE.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert restored.hparams.beta == 0.5 and restored.data_shape == (1, 8, 8)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class TinyEncoder(nn.Module):
    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, out_dim))

    def forward(self, x):
        return self.net(x)


def test_injected_networks_are_used_and_not_stored_as_hyperparameters():
    encoder, decoder = TinyEncoder(2 * 5), nn.Sequential(nn.Linear(5, 64), nn.Unflatten(1, (1, 8, 8)))
    model = VAE(latent_dim=5, data_shape=(1, 8, 8), encoder=encoder, decoder=decoder)
    assert model.encoder is encoder and model.decoder is decoder
    assert "encoder" not in model.hparams and "decoder" not in model.hparams
    before = encoder.net[1].weight.clone()
    loader = DataLoader(TensorDataset(images(32)), batch_size=8)
    trainer(max_epochs=1).fit(model, train_dataloaders=loader)
    assert not torch.equal(before, encoder.net[1].weight)


def test_an_encoder_with_the_wrong_output_size_is_named_in_the_error():
    model = VAE(latent_dim=5, data_shape=(1, 8, 8), encoder=TinyEncoder(5))
    with pytest.raises(ValueError, match=r"encoder must output shape \(B, 10\) for latent_dim=5"):
        model.encode(images(2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"latent_dim": 0}, "latent_dim must be a positive integer"),
        ({"latent_dim": -3}, "latent_dim must be a positive integer"),
        ({"beta": -0.1}, "beta must be >= 0"),
        ({"free_bits": -1.0}, "free_bits must be >= 0"),
        ({"optimizer": torch.optim.Adam([torch.zeros(1, requires_grad=True)])}, "optimizer must be a callable"),
        ({"lr_scheduler": 0.5}, "lr_scheduler must be a callable"),
        ({"likelihood": "poisson"}, "choose one of: bernoulli, continuous_bernoulli, gaussian, gaussian_learned"),
        ({"architecture": "resnet"}, "choose one of: mlp, conv"),
        ({"value_range": (-1.0, 1.0)}, "bernoulli likelihood models pixels in"),
        ({"data_shape": (8, 8)}, "data_shape must be three sizes"),
        ({"data_shape": (1, 0, 8)}, "must be positive sizes"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
    ],
)
def test_bad_constructor_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAE(**{"data_shape": (1, 8, 8), **kwargs})


@pytest.mark.parametrize(
    "data_shape, message",
    [((1, 28, 28), r"built for examples of shape \(1, 28, 28\).*yields \(1, 8, 8\)"), ((3, 8, 8), r"\(3, 8, 8\)")],
)
def test_a_model_that_does_not_fit_the_datamodule_fails_before_training(data_shape, message, digits):
    with pytest.raises(ValueError, match=message):
        trainer(fast_dev_run=True).fit(VAE(data_shape=data_shape), datamodule=digits)


def test_a_batch_of_the_wrong_shape_is_named():
    loader = DataLoader(TensorDataset(torch.rand(8, 3, 8, 8)), batch_size=4)
    with pytest.raises(ValueError, match=r"expects batches of shape \(B, 1, 8, 8\).*\(4, 3, 8, 8\)"):
        trainer(fast_dev_run=True).fit(VAE(**DIGITS), train_dataloaders=loader)


def test_an_empty_training_set_fails_instead_of_training_nothing():
    class Empty(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.rand(0, 1, 8, 8)), batch_size=4)

    with pytest.raises(ValueError, match="training dataloader is empty"):
        trainer(max_epochs=1).fit(VAE(**DIGITS), datamodule=Empty())


def test_a_conditional_model_on_unlabelled_data_says_so():
    loader = DataLoader(TensorDataset(images(8)), batch_size=4)
    with pytest.raises(ValueError, match="conditional.*no labels"):
        trainer(fast_dev_run=True).fit(VAE(num_classes=10, **DIGITS), train_dataloaders=loader)


def test_a_nonfinite_step_is_skipped_without_touching_the_weights():
    model = VAE(latent_dim=2, **DIGITS)
    before = [p.detach().clone() for p in model.parameters()]
    nan_batch = DataLoader(TensorDataset(torch.full((8, 1, 8, 8), float("nan"))), batch_size=8)
    with pytest.warns(UserWarning, match="skipping a training step with non-finite loss terms: loss, elbo"):
        trainer(max_epochs=1).fit(model, train_dataloaders=nan_batch)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    x = images(16)
    x[:8] = float("nan")  # the first of two batches
    trainer(max_epochs=1).fit(model, train_dataloaders=DataLoader(TensorDataset(x), batch_size=8))
    assert all(p.isfinite().all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert model.nonfinite_steps == 0  # reset by the finite step


def test_repeated_nonfinite_steps_stop_training_naming_the_terms():
    model = VAE(latent_dim=2, **DIGITS)
    model.max_nonfinite_steps = 3
    nan_batches = DataLoader(TensorDataset(torch.full((32, 1, 8, 8), float("nan"))), batch_size=8)
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss terms \(loss, elbo, reconstruction, kl\) in 3 training steps"
    ):
        trainer(max_epochs=1).fit(model, train_dataloaders=nan_batches)


def test_resuming_from_a_checkpoint_reproduces_an_uninterrupted_run(digits, tmp_path):
    """Same weights, optimizer state and schedule position after 2 epochs straight or 1 + resume."""
    from callbacks import ParameterSchedule

    def run(max_epochs: int, ckpt_path=None, folder=tmp_path / "a") -> tuple[VAE, L.Trainer]:
        L.seed_everything(0, verbose=False)
        model = VAE(latent_dim=3, data_shape=(1, 8, 8), hidden_dims=[32], free_bits=0.1)
        callbacks = [
            ParameterSchedule("beta", "cyclical", num_steps=30),
            ModelCheckpoint(dirpath=folder, save_last=True),
        ]
        t = trainer(max_epochs=max_epochs, enable_checkpointing=True, callbacks=callbacks)
        t.fit(model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
        return model, t

    straight, t_straight = run(2)
    run(1, folder=tmp_path / "b")
    torch.manual_seed(123)  # whatever the random state before resuming, the checkpoint restores it
    resumed, t_resumed = run(2, ckpt_path=tmp_path / "b" / "last.ckpt", folder=tmp_path / "b")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    adam_a, adam_b = t_straight.optimizers[0].state_dict(), t_resumed.optimizers[0].state_dict()
    assert all(torch.equal(adam_a["state"][k]["exp_avg"], adam_b["state"][k]["exp_avg"]) for k in adam_a["state"])
    assert straight.beta == resumed.beta and t_resumed.callbacks[0].batches_seen == 40


def test_training_terms_are_logged_on_the_loggers_steps_and_as_exact_epoch_means(tmp_path):
    """log_terms bypasses self.log per step (benchmarks/overhead.py): the logged values must still be right."""

    class Recorder(L.Callback):
        losses: list[tuple[float, int]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append((outputs["loss"].item(), batch[0].shape[0]))

    data = DataLoader(TensorDataset(images(50), torch.zeros(50)), batch_size=16)  # batches of 16, 16, 16, 2
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    t = trainer(max_epochs=2, logger=logger, log_every_n_steps=3, callbacks=[Recorder()])
    t.fit(VAE(latent_dim=2, **DIGITS), data)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    step_rows = [row for row in rows if row["train/loss_step"]]
    assert [int(row["step"]) for row in step_rows] == [2, 5]  # every 3rd of 8 steps
    assert [float(row["train/loss_step"]) for row in step_rows] == pytest.approx(
        [Recorder.losses[2][0], Recorder.losses[5][0]]
    )
    epoch_means = [float(row["train/loss"]) for row in rows if row["train/loss"]]
    expected = [
        sum(loss * n for loss, n in epoch) / sum(n for _, n in epoch)
        for epoch in (Recorder.losses[:4], Recorder.losses[4:])
    ]
    assert epoch_means == pytest.approx(expected, rel=1e-5)
    assert t.callback_metrics["train/loss"] == pytest.approx(expected[1], rel=1e-5)


def test_resuming_with_other_settings_in_python_names_them(digits, tmp_path):
    """The same check as the command line's, for trainer.fit(model, ckpt_path=...) in a user's own script."""
    first = trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ModelCheckpoint(tmp_path, save_last=True)])
    first.fit(VAE(latent_dim=3, beta=1.0, **DIGITS), datamodule=digits)
    with pytest.raises(ValueError, match=r"beta: 1.0 in the checkpoint, 2.0 now; latent_dim: 3 in the checkpoint, 4"):
        trainer(max_epochs=2).fit(
            VAE(latent_dim=4, beta=2.0, **DIGITS), datamodule=digits, ckpt_path=tmp_path / "last.ckpt"
        )
