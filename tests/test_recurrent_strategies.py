"""The RecurrentVAE's strategy options (issue 13, point 4): the iwae objective and the hyperspherical posteriors,
from Python and the command line, under bf16, the divergence policy and resume. The distributions themselves are
checked in tests/test_distributions.py, the objectives in tests/test_vae_objectives.py."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.distributions import kl_divergence
from torch.utils.data import DataLoader, TensorDataset

from dgm_lightning import RecurrentVAE
from dgm_lightning.cli import main
from dgm_lightning.distributions import HypersphericalUniform
from tests.helpers import trainer

SPHERICAL = ["power_spherical", "von_mises_fisher"]
STEPS, FEATURES = 6, 5


def sequences(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, lengths): n binary sequences of STEPS steps, four patterns in turn (so a code can tell them apart), the
    first n // 2 shorter, as a DataModule yields them."""
    generator = torch.Generator().manual_seed(seed)
    patterns = (torch.rand(4, STEPS, FEATURES, generator=generator) > 0.5).float()
    x = patterns[torch.arange(n) % 4]
    return x, torch.tensor([STEPS - 2] * (n // 2) + [STEPS] * (n - n // 2))


def spherical(posterior: str, **kwargs) -> RecurrentVAE:
    torch.manual_seed(0)
    return RecurrentVAE(
        latent_dim=3, input_dim=FEATURES, likelihood="bernoulli", hidden_dims=[32], posterior=posterior, **kwargs
    )


@pytest.mark.parametrize("posterior", SPHERICAL)
def test_a_hyperspherical_recurrent_vae_codes_on_the_sphere_with_the_kl_to_the_uniform_and_trains(posterior):
    model = spherical(posterior, optimizer=partial(torch.optim.Adam, lr=1e-2))
    batch = sequences()
    codes = model.encode(*batch)
    assert torch.allclose(codes.norm(dim=-1), torch.ones(16), atol=1e-5)
    model.eval()
    torch.manual_seed(1)
    terms = model.objective(batch).terms
    torch.manual_seed(1)
    q = model.posterior(*batch)
    expected_kl = kl_divergence(q, HypersphericalUniform(3)).mean()
    assert torch.allclose(terms["kl"], expected_kl) and "mi" not in terms  # mi: a Gaussian estimate
    model.train()
    optimizer = model.configure_optimizers()["optimizer"]
    torch.manual_seed(2)
    first = torch.stack([model.objective(batch).loss.detach() for _ in range(5)]).mean()
    for _ in range(100):
        optimizer.zero_grad()
        model.objective(batch).loss.backward()
        optimizer.step()
    last = torch.stack([model.objective(batch).loss.detach() for _ in range(5)]).mean()
    assert last < first - 8.0, (first, last)  # nats per sequence of up to 30 binary values


@pytest.mark.parametrize("posterior", SPHERICAL)
def test_a_hyperspherical_recurrent_vae_samples_the_uniform_prior_and_its_iwae_bound_is_tighter(posterior):
    model = spherical(posterior, objective="iwae", training_samples=4)
    z = model.latent_from_noise(torch.randn(500, 3) * 0.01)  # any scale: the direction alone counts
    assert torch.allclose(z.norm(dim=-1), torch.ones(500), atol=1e-5)
    assert z.mean(0).abs().max() < 0.15  # uniform on the sphere: mean 0 (n = 500, each coordinate's sd ~ 0.026)
    assert torch.equal(model.latent_from_noise(torch.zeros(2, 3)), torch.eye(3)[:1].expand(2, 3))
    assert torch.equal(model.sample(2, temperature=0.0, max_len=STEPS), model.from_noise(torch.zeros(2, 3))[:, :STEPS])
    assert model.sample(4, max_len=STEPS).shape == (4, STEPS, FEATURES)
    model.eval()
    batch = sequences()
    torch.manual_seed(0)
    terms = [model.objective(batch).terms for _ in range(10)]
    assert all(torch.equal(t["loss"], -t["iwae"]) for t in terms)
    assert torch.stack([t["iwae"] for t in terms]).mean() > torch.stack([t["elbo"] for t in terms]).mean()
    with torch.no_grad():
        assert model.log_prob(*batch, num_samples=8).isfinite().all()


@pytest.mark.parametrize("posterior", SPHERICAL)
def test_a_hyperspherical_recurrent_vae_trains_under_bf16_and_skips_a_nonfinite_batch(posterior):
    model = spherical(posterior)
    before = [p.detach().clone() for p in model.parameters()]
    x, lengths = sequences()
    x[:8] = float("nan")  # the first of two batches: skipped; the second trains

    def batches(x):
        return DataLoader(TensorDataset(x, lengths), batch_size=8)

    with pytest.warns(UserWarning, match="skipping a training step with non-finite loss terms"):
        trainer(max_epochs=1).fit(model, train_dataloaders=batches(x))
    assert all(p.isfinite().all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    trainer(max_epochs=1, precision="bf16-mixed").fit(model, train_dataloaders=batches(sequences()[0]))
    assert all(p.isfinite().all() for p in model.parameters())


def test_a_hyperspherical_recurrent_vae_trains_from_the_command_line_resumes_and_loads(tmp_path):
    # the recipe's free bits are a per-dimension KL floor, which the sphere's KL does not have: they go
    flags = ["--config", "rvae_digits_rows", "--model.posterior", "von_mises_fisher", "--model.free_bits", "0",
             "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
             "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    cli = main(["fit", *flags, "--trainer.max_epochs", "1"])
    assert cli.trainer.callback_metrics["val/elbo"].isfinite()
    last = cli.trainer.checkpoint_callback.last_model_path
    resumed = main(["fit", *flags, "--trainer.max_epochs", "2", "--ckpt_path", last])
    assert resumed.trainer.current_epoch == 2
    loaded = RecurrentVAE.load_from_checkpoint(resumed.trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert loaded.posterior_name == "von_mises_fisher"
    batch = next(iter(resumed.datamodule.val_dataloader()))
    resumed.model.eval(), loaded.eval()
    assert torch.allclose(loaded.encode(*batch), resumed.model.encode(*batch))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"posterior": "power_spherical", "free_bits": 0.5}, "free_bits needs a KL per latent dimension"),
        ({"posterior": "von_mises_fisher", "latent_dim": 1}, "lives on the unit sphere in latent_dim dimensions"),
        ({"posterior": "circle"}, "unknown posterior 'circle'; choose one of: gaussian, power_spherical"),
    ],
)
def test_the_recurrent_vae_refuses_an_undefined_posterior(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RecurrentVAE(input_dim=8, likelihood="bernoulli", **kwargs)


# -- the iwae objective ---------------------------------------------------------------------------------------------


def test_the_recurrent_vae_trains_on_the_iwae_bound_from_the_command_line():
    # the recipe's free bits are the ELBO's: the iwae objective refuses them, so they go
    flags = ["--model.objective", "iwae", "--model.training_samples", "3", "--model.free_bits", "0",
             "--trainer.max_epochs", "1",
             "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
             "--trainer.logger", "false"]  # fmt: skip
    cli = main(["fit", "--config", "rvae_digits_rows", *flags])
    model = cli.model
    assert model.objective_name == "iwae" and cli.trainer.callback_metrics["val/iwae"].isfinite()
    batch = next(iter(cli.datamodule.val_dataloader()))
    model.eval()
    model.beta = 1.0  # the recipe anneals it: at 1 the loss is the plain bound
    torch.manual_seed(0)
    terms = [model.objective(batch).terms for _ in range(20)]
    assert all(torch.equal(t["loss"], -t["iwae"]) for t in terms)
    assert torch.stack([t["iwae"] for t in terms]).mean() > torch.stack([t["elbo"] for t in terms]).mean()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"objective": "iwae"}, "iwae objective with training_samples=1 is the ELBO"),
        ({"objective": "iwae", "training_samples": 3, "free_bits": 0.5}, "free_bits applies to the elbo objective"),
        ({"training_samples": 3}, "training_samples applies to the iwae objective"),
        ({"objective": "beta_tc"}, "unknown objective 'beta_tc'; choose one of: elbo, iwae"),
    ],
)
def test_the_recurrent_vae_refuses_objective_settings_it_would_ignore(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RecurrentVAE(input_dim=8, likelihood="bernoulli", **kwargs)
