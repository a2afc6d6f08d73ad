"""FlowVAE: the VAE's metrics with a planar-flow posterior; reduces to the VAE, valid IWAE bound, learns."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from datamodules import DigitsDataModule
from dgm_lightning import VAE, FlowVAE
from tests.helpers import images, trainer

DIGITS = dict(data_shape=(1, 8, 8), hidden_dims=[32])


def test_with_zero_flows_it_is_the_vae():
    """Same weights, same noise: the same reconstruction term; the Monte Carlo KL averages to the closed form."""
    vae = VAE(latent_dim=3, **DIGITS)
    flow_vae = FlowVAE(latent_dim=3, num_flows=0, **DIGITS)
    flow_vae.load_state_dict(vae.state_dict())
    x = images(2).repeat(2000, 1, 1, 1)
    torch.manual_seed(0)
    vae_terms = vae.objective(x).terms
    torch.manual_seed(0)
    terms = flow_vae.objective(x).terms
    torch.testing.assert_close(terms["reconstruction"], vae_terms["reconstruction"])
    assert terms["kl"].item() == pytest.approx(vae_terms["kl"].item(), abs=0.05)
    assert terms["elbo"].item() == pytest.approx(vae_terms["elbo"].item(), abs=0.05)


def test_the_iwae_estimate_is_a_valid_bound_on_the_exact_marginal_likelihood():
    """One latent dimension: log p(x) by quadrature. IWAE must approach it from below as samples grow."""
    model = FlowVAE(latent_dim=1, num_flows=3, data_shape=(1, 2, 2), hidden_dims=[8], likelihood="gaussian",
                    gaussian_scale=0.5).double()  # fmt: skip
    last = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # w of each flow away from 0, where planar flows shift by about 1 / |w| (huge in 1D)
        last.bias[torch.arange(3) * 3 + 3] += 1.0  # outputs: mean, log-variance, then (u, w, b) per flow
    x = torch.rand(4, 1, 2, 2, dtype=torch.float64)
    z = torch.linspace(-10, 10, 20001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        px_z = model.decoder_distribution(z, None)
        log_px_z = torch.stack([px_z.log_prob(xi.expand(len(z), -1, -1, -1)) for xi in x])  # (4, 20001)
    exact = torch.logsumexp(log_px_z + model.prior.log_prob(z).squeeze(1), dim=1) + math.log(z[1, 0] - z[0, 0])
    elbo = torch.stack([model.log_prob(x, num_samples=1) for _ in range(2000)]).mean(0)  # E[log w], K = 1
    iwae_10 = torch.stack([model.log_prob(x, num_samples=10) for _ in range(200)]).mean(0)
    estimate = model.log_prob(x, num_samples=20000)
    assert (elbo < iwae_10).all() and (iwae_10 < exact + 0.02).all(), (elbo, iwae_10, exact)  # 0.02: Monte Carlo error
    torch.testing.assert_close(estimate, exact, atol=0.02, rtol=0)


def test_the_flows_change_the_posterior_and_every_parameter_gets_a_gradient():
    model = FlowVAE(latent_dim=3, num_flows=2, num_classes=4, **DIGITS)
    x, y = images(8), torch.arange(8) % 4
    q0, params = model.posterior_and_flows(x, labels=y)
    assert params.shape == (8, 2, 7)
    z0 = q0.sample()
    z, logdet = model.apply_flows(z0, params)
    assert not torch.allclose(z, z0) and logdet.shape == (8,)
    objective = model.objective((x, y))
    assert objective.codes.shape == (8, 3) and all(v.isfinite() for v in objective.terms.values())
    objective.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_loss_falls_on_a_fixed_batch():
    digits = DigitsDataModule()
    digits.setup()
    x = digits.splits["train"].tensors[0][:32]
    model = FlowVAE(latent_dim=4, num_flows=4, **DIGITS)
    optimizer = model.configure_optimizers()["optimizer"]
    torch.manual_seed(0)
    first = torch.stack([model.objective(x).loss for _ in range(10)]).mean().item()
    for _ in range(150):
        optimizer.zero_grad()
        model.objective(x).loss.backward()
        optimizer.step()
    last = torch.stack([model.objective(x).loss for _ in range(10)]).mean().item()
    assert last < first - 3.0, (first, last)


def active_units_by_hand(model: FlowVAE, x: torch.Tensor) -> int:
    """Latent dimensions whose code (z_K of the posterior mean) varies by more than 0.01 over all of x at once."""
    with torch.no_grad():
        codes = model.eval().encode(x)
    return int((codes.var(dim=0) > 0.01).sum())


def test_trains_tests_with_the_vae_metric_names_and_reloads(tmp_path):
    digits = DigitsDataModule(batch_size=64)
    model = FlowVAE(latent_dim=4, num_flows=2, iwae_samples=8, **DIGITS)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, enable_checkpointing=True,
                callbacks=[checkpoint])  # fmt: skip
    t.fit(model, datamodule=digits)
    (metrics,) = trainer(limit_test_batches=1).test(model, datamodule=digits, verbose=False)
    assert {"test/elbo", "test/kl", "test/reconstruction", "test/nll"} <= set(metrics)
    assert metrics["test/nll"] <= -metrics["test/elbo"] + 1.0  # IWAE is at least about as tight as the ELBO
    validation_images = torch.cat([x for x, _ in itertools.islice(digits.val_dataloader(), 2)])
    assert t.callback_metrics["val/active_units"] == active_units_by_hand(model, validation_images)
    # a known construction: z_K[0] is constant (mean 0, and u, w of every planar flow 0 in that dimension, so
    # the flows leave it alone) and z_0[1] varies a hundred times more; the data are two batches, all zeros
    # then all ones, so that the codes vary between the batches but not within one
    *_, out = (m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))
    d, per_flow = model.latent_dim, 2 * model.latent_dim + 1
    with torch.no_grad():
        rows = [0] + [2 * d + k * per_flow + i for k in range(model.num_flows) for i in (0, d)]  # loc, u, w
        out.weight[rows], out.bias[rows] = 0.0, 0.0
        out.weight[1], out.bias[1] = 100 * out.weight[1], 100 * out.bias[1]
    halves = torch.cat([torch.zeros(64, 1, 8, 8), torch.ones(64, 1, 8, 8)])
    expected = active_units_by_hand(model, halves)
    loader = DataLoader(TensorDataset(halves), batch_size=64)
    (validated,) = trainer().validate(model, dataloaders=loader, verbose=False)
    assert validated["val/active_units"] == expected and 1 <= expected <= 3, (validated, expected)
    restored = FlowVAE.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert restored.num_flows == 2 and "free_bits" not in restored.hparams
    assert model.sample(3).shape == (3, 1, 8, 8)


def test_bad_num_flows_fails_clearly():
    with pytest.raises(ValueError, match="num_flows must be an integer >= 0"):
        FlowVAE(num_flows=-1, **DIGITS)


def test_a_learned_mixture_prior_enters_the_kl_and_the_samples_and_gets_gradients():
    torch.manual_seed(0)
    model = FlowVAE(latent_dim=3, num_flows=2, prior="mixture", mixture_components=4, **DIGITS).double()
    x = images(8).double()
    torch.manual_seed(1)
    log_px, log_pz, log_q = model.log_weights(x, None, 5)
    torch.manual_seed(1)
    q0, params = model.posterior_and_flows(x)
    z, _ = model.apply_flows(q0.rsample((5,)), params)
    torch.testing.assert_close(log_pz, model.learned_prior.distribution().log_prob(z), rtol=0, atol=1e-12)
    model.objective(x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.learned_prior.parameters())
    assert model.noise_shape == (4,)  # one more coordinate picks the component
    components = model.learned_prior.distribution().component_distribution.base_dist
    codes = model.codes_from_noise(torch.zeros(1, 4, dtype=torch.float64))
    assert any(torch.allclose(codes[0], loc) for loc in components.loc)  # zero noise: a component's mean
    assert model.sample(6).shape == (6, 1, 8, 8)


def test_a_mixture_prior_flow_vae_resumes_and_loads_with_its_prior(tmp_path):
    from dgm_lightning.cli import main

    flags = ["--config", "flowvae_digits", "--model.prior", "mixture", "--model.mixture_components", "3",
             "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
             "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    cli = main(["fit", *flags, "--trainer.max_epochs", "1"])
    resumed = main(
        ["fit", *flags, "--trainer.max_epochs", "2", "--ckpt_path", cli.trainer.checkpoint_callback.last_model_path]
    )
    assert resumed.trainer.current_epoch == 2
    loaded = FlowVAE.load_from_checkpoint(resumed.trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert loaded.hparams.prior == "mixture"
    for key, value in resumed.model.learned_prior.state_dict().items():
        assert torch.equal(loaded.learned_prior.state_dict()[key], value), key


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prior": "vamp"}, "a FlowVAE's posterior .* has no density in closed form"),
        ({"prior": "uniform"}, "unknown prior 'uniform'; choose one of: standard_normal, mixture"),
        ({"mixture_components": 3}, "mixture_components applies to the mixture prior"),
    ],
)
def test_a_prior_a_flow_vae_cannot_take_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowVAE(latent_dim=3, **DIGITS, **kwargs)
