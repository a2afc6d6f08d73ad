"""GAN: losses and penalties against closed forms, step semantics, learning on a 2D mixture, resume, EMA, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dgm_lightning import GAN, objectives
from dgm_lightning.cli import main
from tests.helpers import trainer

REPO = Path(__file__).resolve().parent.parent
POINTS = dict(img_shape=(2,), architecture="mlp", hidden_dims=[32, 32], latent_dim=4)


def mixture(n: int, seed: int = 0) -> torch.Tensor:
    """n points of an equal mixture of 4 Gaussians (std 0.1) at (+-1, +-1)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    return centres[torch.randint(0, 4, (n,), generator=g)] + 0.1 * torch.randn(n, 2, generator=g)


def loader(x: torch.Tensor, batch_size: int, *labels: torch.Tensor, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, *labels), batch_size=batch_size, shuffle=shuffle)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'|: zero exactly when the two distributions are equal."""
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


class Record(Callback):
    """Keeps what training_step returns (the detached loss terms) for every batch."""

    def __init__(self) -> None:
        self.terms: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.terms.append({k: v.item() for k, v in outputs.items()})


# -- objectives --------------------------------------------------------------------------------


REAL, FAKE = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])
SP = F.softplus  # log(1 + e^x)
# the cross-entropy discriminator loss: mean softplus(-real) + mean softplus(fake)
BCE_D = (math.log(2) + math.log(1 + math.e**-2)) / 2 + (math.log(1 + math.e**-1) + math.log(1 + math.e)) / 2


@pytest.mark.parametrize(
    "kind, d_expected, g_expected",
    [
        ("non_saturating", BCE_D, (math.log(1 + math.e) + math.log(1 + math.e**-1)) / 2),
        ("minimax", BCE_D, -(math.log(1 + math.e**-1) + math.log(1 + math.e)) / 2),
        ("least_squares", 0.5 * (1 + 1) / 2 + 0.5 * (1 + 1) / 2, 0.5 * (4 + 0) / 2),
        ("wasserstein", 0.0 - 1.0, 0.0),
        ("hinge", (1 + 0) / 2 + (0 + 2) / 2, 0.0),
    ],
)  # fmt: skip
def test_gan_losses_match_hand_computed_values(kind, d_expected, g_expected):
    assert objectives.discriminator_loss(kind, REAL, FAKE).item() == pytest.approx(d_expected, abs=1e-6)
    assert objectives.generator_loss(kind, FAKE).item() == pytest.approx(g_expected, abs=1e-6)


def test_label_smoothing_sets_the_real_target():
    # BCE(logit, t) = t softplus(-logit) + (1 - t) softplus(logit); at logit 0 it is log 2 for any t
    expected = (math.log(2) + 0.9 * SP(torch.tensor(-2.0)) + 0.1 * SP(torch.tensor(2.0))) / 2 + SP(FAKE).mean()
    got = objectives.discriminator_loss("non_saturating", REAL, FAKE, real_target=0.9)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    ls = objectives.discriminator_loss("least_squares", REAL, FAKE, real_target=0.9)
    assert ls.item() == pytest.approx(0.5 * (0.81 + 1.21) / 2 + 0.5, abs=1e-6)
    with pytest.raises(ValueError, match="label smoothing"):
        objectives.discriminator_loss("hinge", REAL, FAKE, real_target=0.9)


def test_unknown_loss_lists_the_choices():
    with pytest.raises(ValueError, match="non_saturating, minimax, least_squares, wasserstein, hinge"):
        objectives.generator_loss("vanilla", FAKE)
    with pytest.raises(ValueError, match="choose one of: non_saturating"):
        GAN(loss="vanilla", **POINTS)


def test_penalties_on_a_linear_critic_equal_their_closed_forms():
    # D(x) = w . x has gradient w everywhere, so GP = (||w|| - 1)^2 and R1 = ||w||^2 at any inputs
    w = torch.randn(1, 8, 8, dtype=torch.float64, requires_grad=True)
    real, fake = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randn(5, 1, 8, 8, dtype=torch.float64)
    critic = lambda x: (x * w).flatten(1).sum(1)  # noqa: E731
    gp = objectives.gradient_penalty(critic, real, fake, torch.rand(5, dtype=torch.float64))
    norm = w.detach().norm()
    assert gp.item() == pytest.approx(((norm - 1) ** 2).item(), rel=1e-10)
    r1 = objectives.r1_penalty(critic, real)
    assert r1.item() == pytest.approx((norm**2).item(), rel=1e-10)
    # the penalty is trainable: d GP / dw = 2 (||w|| - 1) w / ||w||
    (grad,) = torch.autograd.grad(gp, w)
    torch.testing.assert_close(grad, 2 * (norm - 1) * w.detach() / norm)


# -- the model ---------------------------------------------------------------------------------


def test_global_step_advances_once_per_optimizer_step():
    model = GAN(n_critic=3, **POINTS)
    t = trainer(max_epochs=1, limit_val_batches=0)
    t.fit(model, loader(mixture(128), 32))  # 4 batches
    assert model.batches_seen == 4 and model.d_steps == 12
    assert t.global_step == 4 * (3 + 1)
    metrics = t.callback_metrics
    assert {"train/d_loss", "train/g_loss", "train/d_real", "train/d_fake"} <= set(metrics)


def test_training_moves_samples_towards_a_2d_mixture():
    data = mixture(2048)
    model = GAN(
        img_shape=(2,), architecture="mlp", hidden_dims=[64, 64], latent_dim=8, loss="hinge", spectral_norm=True,
        lr_g=5e-4, lr_d=1e-3, betas_g=(0.0, 0.9), betas_d=(0.0, 0.9), ema_decay=None,
    )  # fmt: skip
    test_points = mixture(512, seed=1)
    before = energy_distance(model.sample(512), test_points)
    trainer(max_epochs=8, limit_val_batches=0).fit(model, loader(data, 64))  # 256 batches
    after = energy_distance(model.sample(512), test_points)
    # seen with seeds 0, 1, 2: 0.98 -> 0.118, 0.95 -> 0.117, 0.96 -> 0.101 (two data samples: about 0.006);
    # the same run with the non-saturating loss and no spectral norm was unstable (0.21 to 1.0 after)
    assert after < 0.25 * before, (before, after)


@pytest.mark.parametrize(
    "kwargs, stop_after, data, shuffle",
    [
        # mid-epoch: Lightning restarts a plain DataLoader's epoch when it resumes inside one, so the 4 batches
        # of an epoch are identical here; the noise must come out the same by itself
        (dict(loss="wasserstein", gp_weight=1.0, n_critic=2), 2, mixture(32).repeat(4, 1), False),
        # at an epoch end, with shuffled data: the checkpoint also carries the random state of the data order
        (dict(r1_gamma=1.0, r1_interval=3), 4, mixture(128), True),
    ],
    ids=["wgan-gp-mid-epoch", "lazy-r1-epoch-end-shuffled"],
)
def test_resume_gives_the_same_next_losses_as_an_uninterrupted_run(kwargs, stop_after, data, shuffle, tmp_path):
    steps_per_batch = kwargs.get("n_critic", 1) + 1
    reference = Record()
    torch.manual_seed(0)
    model = GAN(instance_noise=0.1, **POINTS, **kwargs)
    trainer(max_epochs=3, limit_val_batches=0, callbacks=[reference]).fit(model, loader(data, 32, shuffle=shuffle))

    torch.manual_seed(0)
    first = trainer(max_steps=stop_after * steps_per_batch, limit_val_batches=0)
    first.fit(GAN(instance_noise=0.1, **POINTS, **kwargs), loader(data, 32, shuffle=shuffle))
    first.save_checkpoint(tmp_path / "stopped.ckpt")
    resumed = Record()
    torch.manual_seed(123)  # as in a fresh process: other random state, other initial weights
    model = GAN(instance_noise=0.1, **POINTS, **kwargs)
    trainer(max_epochs=3, limit_val_batches=0, callbacks=[resumed]).fit(
        model, loader(data, 32, shuffle=shuffle), ckpt_path=tmp_path / "stopped.ckpt"
    )
    assert len(resumed.terms) >= 4
    for got, expected in zip(resumed.terms, reference.terms[stop_after:], strict=False):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_ema_is_used_for_sampling_and_survives_a_checkpoint(tmp_path):
    model = GAN(ema_decay=0.9, **POINTS)
    t = trainer(max_epochs=1, limit_val_batches=0)
    t.fit(model, loader(mixture(128), 32))
    ema = nn.utils.parameters_to_vector(model.ema.module.parameters())
    raw = nn.utils.parameters_to_vector(model.generator.parameters())
    assert not torch.allclose(ema, raw)  # an average lags behind the trained weights
    torch.manual_seed(1)
    z = model.latent(8)
    torch.manual_seed(1)
    assert torch.equal(model.sample(8), model.generate(z, None, net=model.ema.module))

    t.save_checkpoint(tmp_path / "gan.ckpt")
    restored = GAN.load_from_checkpoint(tmp_path / "gan.ckpt")
    assert torch.equal(nn.utils.parameters_to_vector(restored.ema.module.parameters()), ema)
    assert restored.ema.n_averaged.item() == model.ema.n_averaged.item() == 4
    assert restored.batches_seen == 4
    torch.manual_seed(2)
    expected = model.sample(8)
    torch.manual_seed(2)
    assert torch.equal(restored.sample(8), expected)


def test_conditional_gan_samples_the_asked_classes_and_checks_labels():
    model = GAN(latent_dim=8, img_shape=(1, 8, 8), hidden_dims=[8, 16], num_classes=3)
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    data = loader(images, 32, torch.arange(64) % 3)
    t = trainer(max_epochs=1)
    t.fit(model, data, data)
    assert {"val/d_loss", "val/g_loss", "val/d_real", "val/d_fake"} <= set(t.callback_metrics)
    (metrics,) = t.test(model, data, verbose=False)
    assert all(math.isfinite(v) for v in metrics.values()) and "test/d_loss" in metrics
    predictions = t.predict(model, data)
    assert [p["samples"].shape for p in predictions] == [(32, 1, 8, 8)] * 2
    assert model.sample(6, labels=torch.tensor([0, 1, 2, 0, 1, 2])).shape == (6, 1, 8, 8)
    assert model.sample(5).shape == (5, 1, 8, 8)  # default labels cycle through the classes
    z = model.latent(4)
    zeros, twos = model.generate(z, torch.zeros(4, dtype=torch.long)), model.generate(z, torch.full((4,), 2))
    assert not torch.allclose(zeros, twos)  # the label changes the sample
    x = torch.rand(4, 1, 8, 8)
    assert not torch.allclose(
        model.critic(x, torch.zeros(4, dtype=torch.long)), model.critic(x, torch.ones(4, dtype=torch.long))
    )
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        model.sample(2, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        model.sample(2, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="takes no labels"):
        GAN(**POINTS).sample(2, labels=torch.tensor([0, 1]))


def test_every_architecture_fits_the_image_sizes():
    for shape in [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)]:
        model = GAN(latent_dim=8, img_shape=shape, gp_weight=10.0)
        assert model.sample(2).shape == (2, *shape)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.discriminator.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in GAN(latent_dim=8, img_shape=(1, 28, 28)).discriminator.modules())
    unit = GAN(latent_dim=8, img_shape=(1, 28, 28), value_range=(0.0, 1.0)).sample(64)
    assert unit.min() >= 0 and unit.max() <= 1  # tanh mapped onto the data's value range
    with pytest.raises(ValueError, match="divisible by 8"):
        GAN(img_shape=(1, 28, 28), hidden_dims=[8, 8, 8])
    with pytest.raises(ValueError, match="use mlp"):
        GAN(img_shape=(2,), architecture="dcgan")


def test_schedulers_step_once_per_epoch_and_clipping_bounds_each_update():
    model = GAN(
        optimizer_g=lambda p: torch.optim.SGD(p, lr=1.0), optimizer_d=lambda p: torch.optim.SGD(p, lr=1.0),
        scheduler_g=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        gradient_clip_val=1e-6, gradient_clip_algorithm="value", ema_decay=None, **POINTS,
    )  # fmt: skip
    g0 = nn.utils.parameters_to_vector(model.generator.parameters()).detach().clone()
    t = trainer(max_epochs=2, limit_val_batches=0)
    t.fit(model, loader(mixture(32), 32))  # one batch per epoch: two generator steps with SGD, lr 1 then 0.5
    g_opt, d_opt = t.optimizers
    assert g_opt.param_groups[0]["lr"] == 0.25 and d_opt.param_groups[0]["lr"] == 1.0
    moved = (nn.utils.parameters_to_vector(model.generator.parameters()) - g0).abs().max().item()
    # each |step| <= lr * clip value: 1e-6 + 0.5e-6, plus float32 rounding of weights near 1 (about 1e-7)
    assert 0 < moved <= 1.5e-6 + 2e-7


def test_clipping_under_a_loss_scaler_acts_on_the_unscaled_gradients():
    """16-mixed scales the loss and unscales the gradients inside optimizer.step(): the GAN must clip after that.
    (A GradScaler on the CPU here, as 16-mixed uses on a GPU.)"""
    from lightning.pytorch.plugins import MixedPrecision

    model = GAN(
        optimizer_g=lambda p: torch.optim.SGD(p, lr=1.0), optimizer_d=lambda p: torch.optim.SGD(p, lr=1.0),
        gradient_clip_val=1e-3, gradient_clip_algorithm="value", ema_decay=None, **POINTS,
    )  # fmt: skip
    g0 = nn.utils.parameters_to_vector(model.generator.parameters()).detach().clone()
    precision = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    t = trainer(max_steps=2, limit_val_batches=0, plugins=[precision])
    t.fit(model, loader(mixture(32), 32))  # one D step, one G step
    moved = (nn.utils.parameters_to_vector(model.generator.parameters()) - g0).abs().max().item()
    # clipped after unscaling: the largest step is the clip value; clipped before, it would be 1024 times smaller
    assert moved == pytest.approx(1e-3, rel=1e-3)


def test_a_non_finite_batch_updates_neither_network():
    model = GAN(ema_decay=None, **POINTS)
    before = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    bad = mixture(32)
    bad[3, 0] = float("nan")
    t = trainer(max_epochs=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match="skipping a training step with non-finite loss terms: d_loss"):
        t.fit(model, loader(bad, 32))
    assert t.global_step == 0
    assert torch.equal(nn.utils.parameters_to_vector(model.parameters()), before)


def test_a_generator_that_keeps_diverging_stops_training_naming_its_loss():
    model = GAN(ema_decay=None, **POINTS)
    model.max_nonfinite_steps = 3
    model.generator_terms = lambda n, labels, generator: {"g_loss": torch.tensor(float("inf"))}
    g_before = nn.utils.parameters_to_vector(model.generator.parameters()).detach().clone()
    t = trainer(max_epochs=1, limit_val_batches=0)
    # each batch's D step is finite and taken; the G step is skipped, and the third such batch in a row stops
    with pytest.warns(UserWarning, match="g_loss"), pytest.raises(FloatingPointError, match=r"\(g_loss\) in 3"):
        t.fit(model, loader(mixture(256), 32))
    assert model.batches_seen == 3 and t.global_step == 3  # three D steps, no G step
    assert torch.equal(nn.utils.parameters_to_vector(model.generator.parameters()), g_before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_critic=0), "n_critic"),
        (dict(lr_d=-1e-4), "lr_d must be > 0"),
        (dict(ema_decay=1.5), "ema_decay"),
        (dict(loss="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(gp_weight=-1.0), "gp_weight must be >= 0"),
        (dict(gradient_clip_algorithm="max"), "choose one of: norm, value"),
    ],
)
def test_bad_settings_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GAN(**{**POINTS, **kwargs})


def test_batch_norm_in_an_injected_critic_is_refused_with_a_penalty():
    critic = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    with pytest.raises(ValueError, match="batch norm"):
        GAN(gp_weight=10.0, discriminator=critic, **POINTS)


def test_trainer_gradient_clipping_points_at_the_gan_flag():
    with pytest.raises(ValueError, match="--model.gradient_clip_val"):
        trainer(max_epochs=1, gradient_clip_val=1.0).fit(GAN(**POINTS), loader(mixture(32), 32))


def test_optimizers_come_from_the_gan_flags_and_optimizer_is_refused():
    config = str(REPO / "configs" / "dcgan_digits.yaml")
    with pytest.raises(ValueError, match="--optimizer cannot set them.*--model.lr_g.*--model.optimizer_g"):
        main(["fit", "--config", config, "--optimizer", "SGD", "--trainer.logger", "false"])
    cli = main(
        [
            "fit",
            "--config",
            config,
            "--model.optimizer_d",
            "RMSprop",
            "--model.optimizer_d.lr",
            "5e-5",
            "--model.scheduler_g",
            "StepLR",
            "--model.scheduler_g.step_size",
            "3",
            "--model.lr_g",
            "3e-4",
            "--trainer.fast_dev_run",
            "true",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    g_opt, d_opt = cli.trainer.optimizers
    assert type(g_opt).__name__ == "Adam" and g_opt.param_groups[0]["lr"] == 3e-4
    assert g_opt.param_groups[0]["betas"] == (0.5, 0.999)
    assert type(d_opt).__name__ == "RMSprop" and d_opt.param_groups[0]["lr"] == 5e-5
    (scheduler,) = cli.trainer.lr_scheduler_configs
    assert scheduler.scheduler.optimizer is g_opt and scheduler.scheduler.step_size == 3


def test_spectral_norm_bounds_every_discriminator_layer():
    model = GAN(spectral_norm=True, num_classes=3, **POINTS)
    x, labels = torch.randn(16, 2), torch.arange(16) % 3
    for _ in range(20):  # the power iteration refines its estimate at each training-mode forward
        model.critic(x, labels)
    layers = [m for m in model.discriminator.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert len(layers) == 4  # two hidden layers, the score head and the class embedding
    for layer in layers:
        assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() == pytest.approx(1.0, abs=0.02)
