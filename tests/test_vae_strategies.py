"""The VAE's objectives as options (issue 13, point 1): each trains, logs the shared terms, and refuses settings it
would ignore. The objectives themselves are checked against closed forms in tests/test_vae_objectives.py."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules import DigitsDataModule
from dgm_lightning import VAE, FlowVAE
from dgm_lightning.cli import main
from tests.helpers import images, trainer

SMALL = dict(latent_dim=3, data_shape=(1, 8, 8), hidden_dims=[32])
OPTIONS = {
    "elbo": {},
    "iwae": {"training_samples": 4},
    "miwae": {"training_samples": 4, "miwae_groups": 2},
    "piwae": {"training_samples": 4, "miwae_groups": 2},
    "beta_tc": {"dataset_size": 1000, "beta": 4.0},
    "mmd": {"beta": 0.0},
}


@pytest.fixture(scope="module")
def digits_batch() -> torch.Tensor:
    data = DigitsDataModule()
    data.setup()
    return data.splits["train"].tensors[0][:32]


def loss_before_and_after_training(model: VAE, x: torch.Tensor, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's loss on x (a mean of 5 draws) before and after ``steps`` optimizer steps on x."""
    optimizer = model.configure_optimizers()["optimizer"]
    torch.manual_seed(1)
    first = torch.stack([model.objective(x).loss.detach() for _ in range(5)]).mean()
    for _ in range(steps):
        optimizer.zero_grad()
        model.objective(x).loss.backward()
        optimizer.step()
    return first, torch.stack([model.objective(x).loss.detach() for _ in range(5)]).mean()


def vae(objective: str, **kwargs) -> VAE:
    torch.manual_seed(0)
    return VAE(objective=objective, **SMALL, **{**OPTIONS[objective], **kwargs})


@pytest.mark.parametrize("objective", OPTIONS)
def test_every_objective_logs_the_shared_terms_and_its_loss_falls_on_a_fixed_batch(objective, digits_batch):
    model = vae(objective)
    x = digits_batch
    terms = model.objective(x).terms
    assert {"loss", "elbo", "reconstruction", "kl"} <= terms.keys()
    own = {"iwae": {"iwae"}, "miwae": {"miwae", "iwae"}, "beta_tc": {"mi", "tc", "dim_kl"}, "mmd": {"mmd"}}
    assert own.get(objective, set()) <= terms.keys()
    first, last = loss_before_and_after_training(model, x)
    assert last < first - 8.0, (first, last)  # seen: about 46 -> 31 nats for each objective


def test_the_iwae_objective_is_minus_its_bound_and_lies_above_the_elbo():
    model = vae("iwae", training_samples=8).eval()
    x = images(16)
    torch.manual_seed(0)
    terms = [model.objective(x).terms for _ in range(50)]
    iwae = torch.stack([t["iwae"] for t in terms]).mean()
    elbo = torch.stack([t["elbo"] for t in terms]).mean()
    assert all(torch.equal(t["loss"], -t["iwae"]) for t in terms)
    assert iwae > elbo  # the importance-weighted bound is the tighter one


@pytest.mark.parametrize("prior", [None, "mixture", "vamp"])
def test_piwae_trains_the_decoder_and_prior_on_the_iwae_bound_and_the_encoder_on_the_miwae_bound(prior):
    # the same samples in all three (same seed): each network's gradient is that of its own bound
    x = images(8).double()
    settings = {"training_samples": 4} | ({} if prior is None else {"prior": prior, **LEARNED[prior]})

    def gradients(objective: str, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = vae(objective, **{**settings, **kwargs}).double()
        torch.manual_seed(1)
        loss = model.objective(x).loss
        loss.backward()
        return loss, {name: p.grad for name, p in model.named_parameters()}

    loss, piwae = gradients("piwae", miwae_groups=2)
    iwae_loss, iwae = gradients("iwae")
    _, miwae = gradients("miwae", miwae_groups=2)
    assert torch.equal(loss, iwae_loss)
    for name, gradient in piwae.items():
        # the vamp prior is made by the encoder: the encoder's gradient then holds the prior's share of the iwae's
        if prior != "vamp" or not name.startswith("encoder"):
            expected = miwae[name] if name.startswith("encoder") else iwae[name]
            torch.testing.assert_close(gradient, expected, rtol=1e-9, atol=1e-12, msg=name)
    assert not torch.allclose(iwae["encoder.1.weight"], miwae["encoder.1.weight"])  # the bounds do differ


def test_the_mmd_objective_with_beta_zero_is_reconstruction_plus_weighted_mmd():
    model = vae("mmd", mmd_weight=3.0)
    terms = model.objective(images(16)).terms
    torch.testing.assert_close(terms["loss"], -terms["reconstruction"] + 3.0 * terms["mmd"])


def test_beta_tc_splits_the_kl_and_takes_the_training_set_size_from_the_trainer():
    model = vae("beta_tc")
    terms = model.objective(images(16)).terms
    torch.testing.assert_close(terms["mi"] + terms["tc"] + terms["dim_kl"], terms["kl"], rtol=1e-4, atol=1e-4)
    model = VAE(objective="beta_tc", **SMALL)  # no dataset_size, no Trainer
    with pytest.raises(ValueError, match="needs the size of the training set.*dataset_size"):
        model.objective(images(16))

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.size = pl_module.training_set_size(16)

    record = Record()
    data = DataLoader(TensorDataset(images(40)), batch_size=16)
    trainer(max_epochs=1, limit_train_batches=1, callbacks=[record]).fit(model, train_dataloaders=data)
    assert record.size == 40  # the Trainer's training data


@pytest.mark.parametrize("objective", ["beta_tc", "mmd"])
def test_a_batch_of_one_example_trains_on_the_elbo_instead_of_failing(objective):
    model = vae(objective)
    terms = model.objective(images(1)).terms
    assert terms["loss"].isfinite() and "elbo" in terms and not {"tc", "mmd"} & terms.keys()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"objective": "iwae", "free_bits": 0.5}, "free_bits applies to the elbo objective, not to 'iwae'"),
        (
            {"objective": "elbo", "training_samples": 5},
            "training_samples applies to the iwae, miwae and piwae objectives",
        ),
        ({"objective": "iwae"}, "iwae objective with training_samples=1 is the ELBO"),
        ({"objective": "miwae", "training_samples": 4}, "miwae_groups=1 is the iwae objective"),
        ({"objective": "miwae", "training_samples": 5, "miwae_groups": 2}, "miwae_groups divides"),
        ({"objective": "piwae", "training_samples": 4}, "piwae with miwae_groups=1 is the iwae objective"),
        ({"objective": "mmd", "mi_weight": 0.5}, "mi_weight applies to the beta_tc objective"),
        ({"objective": "elbo", "mmd_kernel": "rbf"}, "mmd_kernel applies to the mmd objective"),
        ({"objective": "beta_tc", "mmd_weight": 1.0}, "mmd_weight applies to the mmd objective"),
        ({"objective": "wae"}, "unknown objective 'wae'; choose one of: elbo, iwae, miwae, piwae, beta_tc, mmd"),
        ({"objective": "mmd", "mmd_kernel": "laplace"}, "unknown mmd_kernel 'laplace'"),
        ({"objective": "beta_tc", "dataset_size": 0}, "dataset_size must be a positive integer"),
    ],
)
def test_settings_an_objective_would_ignore_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAE(**SMALL, **kwargs)


@pytest.mark.parametrize("objective", OPTIONS)
def test_every_objective_trains_from_the_command_line_and_its_checkpoint_loads(objective, tmp_path):
    flags = ["--model.objective", objective]
    for name, value in OPTIONS[objective].items():
        if name != "dataset_size":  # taken from the DataModule
            flags += [f"--model.{name}", str(value)]
    cli = main(["fit", "--config", "vae_digits", *flags, "--trainer.max_epochs", "1", "--trainer.limit_train_batches",
                "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false"])  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert metrics["train/loss"].isfinite() and metrics["val/elbo"].isfinite()
    loaded = VAE.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert loaded.objective_name == objective


def test_flow_vae_keeps_its_own_objective_and_takes_none_of_the_vaes():
    model = FlowVAE(**SMALL, num_flows=1)
    assert not {"objective", "training_samples", "mmd_weight"} & model.hparams.keys()
    with pytest.raises(TypeError, match="multiple values for keyword argument 'objective'"):
        FlowVAE(**SMALL, objective="iwae")


# -- latent geometry: hyperspherical posteriors ----------------------------------------------------------------------

SPHERICAL = ["power_spherical", "von_mises_fisher"]


@pytest.mark.parametrize("posterior", SPHERICAL)
def test_a_hyperspherical_posterior_codes_on_the_sphere_and_trains(posterior, digits_batch):
    torch.manual_seed(0)
    model = VAE(posterior=posterior, **SMALL)
    x = digits_batch
    codes = model.encode(x)
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(32), rtol=0, atol=1e-5)
    q = model.posterior(x)
    terms = model.objective(x).terms
    assert set(terms) == {"loss", "elbo", "reconstruction", "kl"}
    first, last = loss_before_and_after_training(model, x)
    assert last < first - 8.0, (first, last)
    # the KL term is the closed form to the uniform on the sphere
    kl = torch.distributions.kl_divergence(q, model.prior)
    assert kl.shape == (32,) and (kl >= 0).all()


@pytest.mark.parametrize("posterior", SPHERICAL)
def test_a_hyperspherical_vae_samples_from_the_uniform_prior_and_its_log_prob_is_a_bound(posterior):
    torch.manual_seed(0)
    model = VAE(posterior=posterior, **SMALL).eval()
    samples = model.sample(6)
    assert samples.shape == (6, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
    assert torch.equal(model.sample(2, temperature=0.0), model.sample(2, temperature=0.0))
    noise = torch.randn(500, 3)
    z = model.latent_from_noise(noise)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(500))
    assert z.mean(0).abs().max() < 0.1  # uniform on the sphere: mean 0
    x = images(4)
    log_p = model.log_prob(x, num_samples=8)
    assert log_p.shape == (4,) and log_p.isfinite().all()
    log_p.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


@pytest.mark.parametrize("posterior", SPHERICAL)
def test_the_circle_is_latent_dim_2_and_trains_under_bf16_with_other_objectives(posterior):
    data = DataLoader(TensorDataset(images(32)), batch_size=16)
    for objective, extra in [("elbo", {}), ("iwae", {"training_samples": 3}), ("mmd", {"beta": 0.0})]:
        torch.manual_seed(0)
        model = VAE(posterior=posterior, objective=objective, latent_dim=2, data_shape=(1, 8, 8), hidden_dims=[16],
                    **extra)  # fmt: skip
        trainer(max_epochs=1, limit_train_batches=2, precision="bf16-mixed").fit(model, train_dataloaders=data)
        assert model.encode(images(3)).norm(dim=-1).sub(1).abs().max() < 1e-5
        assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"latent_dim": 1}, "unit sphere in latent_dim dimensions, at least 2"),
        ({"free_bits": 0.5}, "free_bits needs a KL per latent dimension"),
        ({"objective": "beta_tc"}, "beta_tc objective splits the KL over latent dimensions"),
    ],
)
def test_undefined_combinations_with_a_hyperspherical_posterior_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAE(**{**SMALL, "posterior": "power_spherical", **kwargs})
    with pytest.raises(ValueError, match="unknown posterior 'spherical'"):
        VAE(**SMALL, posterior="spherical")


def test_a_hyperspherical_vae_trains_from_the_command_line_and_resumes_its_checkpoint():
    flags = ["--model.posterior", "von_mises_fisher", "--trainer.limit_train_batches", "2",
             "--trainer.limit_val_batches", "1", "--trainer.logger", "false"]  # fmt: skip
    cli = main(["fit", "--config", "vae_digits", *flags, "--trainer.max_epochs", "1"])
    last = cli.trainer.checkpoint_callback.last_model_path
    resumed = main(["fit", "--config", "vae_digits", *flags, "--trainer.max_epochs", "2", "--ckpt_path", last])
    assert resumed.trainer.current_epoch == 2 and resumed.model.posterior_name == "von_mises_fisher"
    assert VAE.load_from_checkpoint(last, weights_only=True).posterior_name == "von_mises_fisher"


# -- priors: a learned mixture and the VampPrior ---------------------------------------------------------------------

LEARNED = {"mixture": {"mixture_components": 4}, "vamp": {"pseudo_inputs": 20}}


def learned(prior: str, **kwargs) -> VAE:
    torch.manual_seed(0)
    return VAE(prior=prior, **SMALL, **{**LEARNED[prior], **kwargs})


@pytest.mark.parametrize("prior", LEARNED)
def test_a_learned_prior_trains_with_a_monte_carlo_kl_and_gets_gradients(prior, digits_batch):
    model = learned(prior)
    x = digits_batch
    torch.manual_seed(3)
    objective = model.objective(x)
    torch.manual_seed(3)  # the same posterior sample: the KL is log q(z|x) - log p(z) there
    q = model.posterior(x)
    z = q.rsample()
    expected = (q.log_prob(z).sum(-1) - model.prior.log_prob(z)).mean()
    torch.testing.assert_close(objective.terms["kl"], expected)
    objective.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.learned_prior.parameters())
    first, last = loss_before_and_after_training(model, x)
    assert last < first - 8.0, (first, last)


@pytest.mark.parametrize("prior", LEARNED)
def test_a_learned_priors_samples_come_from_it_and_log_prob_uses_it(prior):
    model = learned(prior).eval()
    assert model.noise_shape == (4,)  # latent_dim + the coordinate that picks a component
    torch.manual_seed(0)
    with torch.no_grad():
        z = model.latent_from_noise(torch.randn(200_000, 4))
        reference = model.prior.sample((200_000,))
    torch.testing.assert_close(z.mean(0), reference.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), reference.std(0), atol=0.02, rtol=0)
    samples = model.sample(5)
    assert samples.shape == (5, 1, 8, 8) and torch.equal(
        model.sample(2, temperature=0.0), model.sample(2, temperature=0.0)
    )
    x = images(4)
    log_p = model.log_prob(x, num_samples=16)
    with torch.no_grad():
        log_px, log_pz, log_q = model.log_weights(x, None, 16)
    assert log_p.shape == (4,) and log_p.isfinite().all()
    assert log_pz.shape == (16, 4)  # the learned prior's density, summed over dimensions by the distribution


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"posterior": "power_spherical", "prior": "standard_normal"},
            "does not go with the power_spherical posterior",
        ),
        ({"prior": "uniform"}, "the uniform prior does not go with the gaussian posterior"),
        ({"prior": "vamp", "num_classes": 10}, "vamp"),
        ({"prior": "mixture", "free_bits": 0.5}, "free_bits needs the KL per latent dimension"),
        ({"prior": "vamp", "mixture_components": 3}, "mixture_components applies to the mixture prior"),
        ({"pseudo_inputs": 30}, "pseudo_inputs applies to the vamp prior"),
        ({"prior": "flow"}, "unknown prior 'flow'"),
    ],
)
def test_a_prior_that_does_not_go_with_the_rest_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAE(**{**SMALL, **kwargs})


@pytest.mark.parametrize("prior", LEARNED)
def test_a_learned_prior_trains_from_the_command_line_resumes_and_loads(prior):
    option, value = next(iter(LEARNED[prior].items()))
    flags = ["--model.prior", prior, f"--model.{option}", str(value), "--trainer.limit_train_batches", "2",
             "--trainer.limit_val_batches", "1", "--trainer.logger", "false"]  # fmt: skip
    cli = main(["fit", "--config", "vae_digits", *flags, "--trainer.max_epochs", "1"])
    last = cli.trainer.checkpoint_callback.last_model_path
    resumed = main(["fit", "--config", "vae_digits", *flags, "--trainer.max_epochs", "2", "--ckpt_path", last])
    assert resumed.trainer.current_epoch == 2
    loaded = VAE.load_from_checkpoint(last, weights_only=True)
    state = torch.load(last, weights_only=True)["state_dict"]
    prior_keys = {key for key in state if key.startswith("learned_prior.")}
    assert prior_keys and all(torch.equal(loaded.state_dict()[key], state[key]) for key in prior_keys)


# -- every option under bf16 and the divergence policy ---------------------------------------------------------------

EVERY_OPTION = {
    **{f"objective={name}": {"objective": name, **settings} for name, settings in OPTIONS.items() if name != "elbo"},
    **{f"prior={name}": {"prior": name, **settings} for name, settings in LEARNED.items()},
    **{f"posterior={name}": {"posterior": name} for name in SPHERICAL},
    "conditional, mixture prior": {"prior": "mixture", "num_classes": 3},
    "conditional, von_mises_fisher": {"posterior": "von_mises_fisher", "num_classes": 3},
    "FlowVAE, mixture prior": {"family": FlowVAE, "prior": "mixture", "num_flows": 2},
}


def option_batches(settings: dict, x: torch.Tensor) -> DataLoader:
    tensors = (x, torch.arange(x.shape[0]) % 3) if settings.get("num_classes") else (x,)
    return DataLoader(TensorDataset(*tensors), batch_size=8)


@pytest.mark.parametrize("settings", EVERY_OPTION.values(), ids=EVERY_OPTION.keys())
def test_every_option_trains_under_bf16_and_skips_a_nonfinite_batch_without_touching_the_weights(settings):
    torch.manual_seed(0)
    settings = dict(settings)
    model = settings.pop("family", VAE)(**SMALL, **settings)
    before = [p.detach().clone() for p in model.parameters()]
    x = images(16)
    x[:8] = float("nan")  # the first of two batches: skipped; the second trains
    with pytest.warns(UserWarning, match="skipping a training step with non-finite loss terms"):
        trainer(max_epochs=1).fit(model, train_dataloaders=option_batches(settings, x))
    assert all(p.isfinite().all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    trainer(max_epochs=1, precision="bf16-mixed").fit(model, train_dataloaders=option_batches(settings, images(16)))
    assert all(p.isfinite().all() for p in model.parameters())
