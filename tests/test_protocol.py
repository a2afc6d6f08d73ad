"""One protocol, every family: the checks that callbacks, benchmarks and users rely on, parametrised over the models.

A new family joins by adding one line to FAMILIES (zuko's tests/test_flows.py is the model).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dgm_lightning import AE, GAN, VAE, VQVAE, Classifier, Flow, FlowVAE, RecurrentVAE, VQVAEPrior
from dgm_lightning.objectives import Objective
from dgm_lightning.vocabulary import SPECIALS
from tests.helpers import images, trainer

SHAPE = (1, 8, 8)
TOKENS = [*SPECIALS, "a", "b", "c"]


def image_batches(n: int = 16, *, classes: int | None = None, low: float = 0.0, levels: int | None = None):
    """(images, labels) in [low, 1] (on a grid of ``levels`` values if given), labels 0..classes-1 or none."""
    x = images(n, SHAPE)
    if levels is not None:
        x = torch.round(x * (levels - 1)) / (levels - 1)
    x = low + (1 - low) * x
    return (x, torch.arange(n) % classes) if classes else (x,)


def token_batches(n: int = 16):
    """(ids, lengths): sequences of 1-5 of the tokens a, b, c, padded with <pad>."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 6, (n,), generator=generator)
    ids = torch.randint(4, len(TOKENS), (n, 5), generator=generator)
    ids[torch.arange(5) >= lengths[:, None]] = 0
    return ids, lengths


@dataclass
class Family:
    """A model to check: how to build it (with the keyword arguments a test adds) and the data it trains on."""

    name: str
    build: Callable[..., torch.nn.Module]
    data: Callable[[], tuple[torch.Tensor, ...]]
    networks: tuple[str, ...] = ("",)  # the optimizer suffixes: one optimizer, or one per network (_g, _d)


FAMILIES = [
    Family("AE", partial(AE, latent_dim=2, data_shape=SHAPE, hidden_dims=[16]), image_batches),
    Family("VAE", partial(VAE, latent_dim=2, data_shape=SHAPE, hidden_dims=[16]), image_batches),
    Family(
        "VAE-conditional",
        partial(VAE, latent_dim=2, data_shape=SHAPE, hidden_dims=[16], num_classes=3),
        partial(image_batches, classes=3),
    ),
    Family(
        "VAE-spherical",
        partial(VAE, latent_dim=3, data_shape=SHAPE, hidden_dims=[16], posterior="power_spherical"),
        image_batches,
    ),  # fmt: skip
    Family(
        "VAE-vamp",
        partial(VAE, latent_dim=2, data_shape=SHAPE, hidden_dims=[16], prior="vamp", pseudo_inputs=10),
        image_batches,
    ),  # fmt: skip
    Family("FlowVAE", partial(FlowVAE, latent_dim=2, num_flows=2, data_shape=SHAPE, hidden_dims=[16]), image_batches),
    Family(
        "Flow",
        partial(
            Flow, "realnvp", data_shape=SHAPE, num_scales=1, num_steps=2, hidden_dims=[8, 8], quantization_levels=17
        ),
        partial(image_batches, levels=17),
    ),
    Family(
        "Flow-conditional",
        partial(Flow, "glow", data_shape=SHAPE, num_scales=1, num_steps=2, hidden_dims=[8, 8], num_classes=3),
        partial(image_batches, classes=3, levels=256),
    ),
    Family(
        "GAN",
        partial(GAN, latent_dim=4, data_shape=SHAPE, architecture="mlp", hidden_dims=[16]),
        partial(image_batches, low=-1.0),
        networks=("_g", "_d"),
    ),
    Family(
        "GAN-conditional",
        partial(GAN, latent_dim=4, data_shape=SHAPE, architecture="mlp", hidden_dims=[16], num_classes=3),
        partial(image_batches, classes=3, low=-1.0),
        networks=("_g", "_d"),
    ),
    Family(
        "RecurrentVAE",
        partial(RecurrentVAE, latent_dim=2, vocab=TOKENS, embedding_dim=8, hidden_dims=[16], sample_max_len=5),
        token_batches,
    ),
    Family("VQVAE", partial(VQVAE, 16, 4, data_shape=SHAPE, hidden_dims=[8], residual_channels=4), image_batches),
    Family(
        "VQVAEPrior",  # the second stage, on a fresh (untrained) VQ-VAE each time
        lambda **kw: VQVAEPrior(
            vqvae=VQVAE(16, 4, data_shape=SHAPE, hidden_dims=[8], residual_channels=4), channels=8, num_layers=2, **kw
        ),
        image_batches,
    ),
    Family(
        "Classifier",
        partial(Classifier, num_classes=3, data_shape=SHAPE, feature_dim=8, hidden_dims=[4, 8]),
        partial(image_batches, classes=3),
    ),
]
GENERATIVE = [family for family in FAMILIES if family.name != "Classifier"]


def ids(families: list[Family]) -> list[str]:
    return [family.name for family in families]


def with_method(name: str) -> list[Family]:
    """The families whose models have the method (encode, log_prob, ...)."""
    return [family for family in GENERATIVE if hasattr(family.build(), name)]


def loader(family: Family) -> DataLoader:
    return DataLoader(TensorDataset(*family.data()), batch_size=8)


def first_batch(family: Family):
    return next(iter(loader(family)))


def objectives_of(model, batch) -> list[Objective]:
    """Every objective the model trains: one, or one per network."""
    if isinstance(model, GAN):
        return [model.discriminator_objective(batch), model.generator_objective(batch)]
    return [model.objective(batch)]


@pytest.mark.parametrize("family", GENERATIVE, ids=ids(GENERATIVE))
def test_sample_has_the_data_shape_and_range(family):
    torch.manual_seed(0)
    model = family.build().eval()
    samples = model.sample(6)
    if isinstance(model, RecurrentVAE):  # token ids, each row ending in <eos> or at sample_max_len (+ <eos>)
        assert samples.shape[0] == 6 and samples.shape[1] <= 6 and samples.dtype == torch.long
        assert samples.min() >= 0 and samples.max() < len(TOKENS)
    else:
        low, high = model.value_range
        assert samples.shape == (6, *SHAPE) and samples.isfinite().all()
        assert samples.min() >= low and samples.max() <= high
    assert torch.equal(model.sample(3, temperature=0.0), model.sample(3, temperature=0.0))  # the mode: no noise


@pytest.mark.parametrize("family", GENERATIVE, ids=ids(GENERATIVE))
def test_labels_are_taken_exactly_by_the_conditional_models(family):
    model = family.build().eval()
    if "labels" not in inspect.signature(model.sample).parameters:
        assert model.num_classes is None  # a family without labels takes none (RecurrentVAE)
        return
    if model.num_classes is None:
        with pytest.raises(ValueError, match="unconditional"):
            model.sample(2, labels=torch.tensor([0, 1]))
        return
    torch.manual_seed(0)
    given = model.sample(3, labels=torch.tensor([0, 1, 2]))
    torch.manual_seed(0)
    assert torch.equal(given, model.sample(3))  # the classes in turn, by default
    with pytest.raises(ValueError, match="labels must lie in"):
        model.sample(2, labels=torch.tensor([0, 3]))


@pytest.mark.parametrize("family", with_method("decode"), ids=ids(with_method("decode")))
def test_encode_and_decode_map_between_data_and_codes(family):
    model = family.build().eval()
    x, *labels = first_batch(family)
    kwargs = {"labels": labels[0]} if model.num_classes else {}
    codes = model.encode(x, **kwargs)
    assert codes.shape == (x.shape[0], model.latent_dim)
    assert model.decode(codes, **kwargs).shape == x.shape


@pytest.mark.parametrize("family", with_method("log_prob"), ids=ids(with_method("log_prob")))
def test_log_prob_is_finite_per_example_and_differentiable(family):
    torch.manual_seed(0)
    model = family.build()
    x, *rest = first_batch(family)
    if isinstance(model, RecurrentVAE):
        log_p = model.log_prob(x, rest[0], num_samples=4)
    elif isinstance(model, Flow):
        kwargs = {"labels": rest[0]} if model.num_classes else {}
        log_p = model.log_prob(model.dequantize(x), **kwargs)
    else:
        kwargs = {"labels": rest[0]} if model.num_classes else {}
        if "num_samples" in inspect.signature(model.log_prob).parameters:  # not the VQ-VAEs' (one-hot posteriors)
            kwargs["num_samples"] = 4
        log_p = model.log_prob(x, **kwargs)
    assert log_p.shape == (x.shape[0],) and log_p.isfinite().all()
    log_p.sum().backward()  # the same gradient behaviour in every family
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES, ids=ids(FAMILIES))
def test_the_objective_names_its_terms_and_its_loss_trains_the_model(family):
    model = family.build()
    for objective in objectives_of(model, first_batch(family)):
        assert isinstance(objective, Objective) and objective.batch_size == 8
        assert objective.loss.dim() == 0 and objective.loss.isfinite() and objective.loss.requires_grad
        assert all(value.dim() == 0 for value in objective.terms.values())


@pytest.mark.parametrize("family", FAMILIES, ids=ids(FAMILIES))
def test_injected_optimizer_and_scheduler_are_the_ones_that_train(family):
    injected = {}
    for suffix in family.networks:
        injected[f"optimizer{suffix}"] = partial(torch.optim.SGD, lr=0.05, momentum=0.5)
        injected[f"lr_scheduler{suffix}"] = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    model = family.build(**injected)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer(max_epochs=2, limit_train_batches=2).fit(model, train_dataloaders=loader(family))
    assert len(model.trainer.optimizers) == len(family.networks)
    for optimizer in model.trainer.optimizers:
        assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.5
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)  # halved after each of 2 epochs
    moved = [name for name, p in model.named_parameters() if not torch.equal(before[name], p)]
    assert moved, "no parameter moved"


@pytest.mark.parametrize("family", FAMILIES, ids=ids(FAMILIES))
def test_a_checkpoint_round_trip_gives_the_same_model(family, tmp_path):
    model = family.build()
    fit = trainer(max_epochs=1, limit_train_batches=2, default_root_dir=tmp_path)
    fit.fit(model, train_dataloaders=loader(family))
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    loaded = type(model).load_from_checkpoint(path, weights_only=True)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[key], loaded_state[key]) for key in state)
    if family in GENERATIVE:
        model.eval(), loaded.eval()
        torch.manual_seed(1)
        expected = model.sample(4)
        torch.manual_seed(1)
        assert torch.equal(loaded.sample(4), expected)


def test_every_family_is_checked():
    import dgm_lightning

    exported = {
        name
        for name in dgm_lightning.__all__
        if inspect.isclass(getattr(dgm_lightning, name))
        and issubclass(getattr(dgm_lightning, name), dgm_lightning.GenerativeModel)
        and not inspect.isabstract(getattr(dgm_lightning, name))
    }
    checked = {family.name.split("-")[0] for family in FAMILIES}
    assert exported - {"GenerativeModel", "LatentVariableModel"} <= checked, exported - checked


# one shipped recipe per family, and its optimizer suffixes
RECIPES = [
    ("ae_digits", ("",)),
    ("vae_digits", ("",)),
    ("flowvae_digits", ("",)),
    ("glow_digits", ("",)),
    ("dcgan_digits", ("_g", "_d")),
    ("rvae_digits_rows", ("",)),
    ("classifier_digits", ("",)),
    ("vqvae_digits", ("",)),
]


@pytest.mark.parametrize("recipe, networks", RECIPES, ids=[recipe for recipe, _ in RECIPES])
def test_the_command_line_injects_optimizer_and_scheduler_the_same_way_in_every_family(recipe, networks):
    from dgm_lightning.cli import main

    flags = []
    for suffix in networks:
        flags += [f"--model.optimizer{suffix}", "AdamW", f"--model.optimizer{suffix}.lr", "3e-4"]
        flags += [f"--model.lr_scheduler{suffix}", "StepLR", f"--model.lr_scheduler{suffix}.step_size", "1"]
    cli = main(["fit", "--config", recipe, *flags, "--trainer.fast_dev_run", "1", "--trainer.logger", "false"])
    optimizers = cli.trainer.optimizers
    assert len(optimizers) == len(networks)
    for optimizer in optimizers:
        # AdamW's own weight decay (0.01), not that of a default class carried over (Adam's 0)
        assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 0.01
        assert optimizer.param_groups[0]["initial_lr"] == 3e-4
    schedulers = [config.scheduler for config in cli.trainer.lr_scheduler_configs]
    assert [type(s) for s in schedulers] == [torch.optim.lr_scheduler.StepLR] * len(networks)
    assert [s.optimizer for s in schedulers] == optimizers
