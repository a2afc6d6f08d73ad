"""The default optimizers: Adam with lr 1e-3 (a GAN's: GeneratorAdam, DiscriminatorAdam), fused where the device has
the kernel, which updates as torch's default loop does, and a caller's choice of kernel kept."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dgm_lightning import GAN, VAE
from dgm_lightning.cli import DGMCLI
from dgm_lightning.optimizers import DiscriminatorAdam, FusedAdam, GeneratorAdam
from tests.helpers import images


def vae() -> VAE:
    torch.manual_seed(0)
    return VAE(latent_dim=4, data_shape=(1, 8, 8), hidden_dims=[32])


def test_a_model_given_no_optimizer_trains_with_fused_adam_on_the_cpu():
    optimizer = vae().configure_optimizers()["optimizer"]
    assert type(optimizer) is FusedAdam and optimizer.defaults["lr"] == 1e-3
    assert optimizer.defaults["fused"] is True
    gan = GAN(data_shape=(2,), latent_dim=2, architecture="mlp")
    g, d = (config["optimizer"] for config in gan.configure_optimizers())
    assert g.defaults["fused"] is True and d.defaults["fused"] is True


def test_fused_adam_makes_the_updates_of_torchs_default_loop():
    fused, loop = vae(), vae()
    optimizers = [FusedAdam(fused.parameters()), torch.optim.Adam(loop.parameters(), lr=1e-3, foreach=False)]
    x = images(16)
    for _ in range(5):
        for model, optimizer in zip((fused, loop), optimizers, strict=True):
            torch.manual_seed(1)  # the same posterior samples
            optimizer.zero_grad()
            model.objective(x).loss.backward()
            optimizer.step()
    for a, b in zip(fused.parameters(), loop.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(fused.parameters()), next(vae().parameters()))  # they did train


@pytest.mark.parametrize("choice", [{"fused": False}, {"foreach": True}])
def test_a_kernel_chosen_by_the_caller_is_kept(choice):
    params = list(vae().parameters())
    for cls in (FusedAdam, GeneratorAdam, DiscriminatorAdam):
        optimizer = cls(params, **choice)
        assert optimizer.defaults["fused"] in (False, None)
        assert all(optimizer.defaults[key] == value for key, value in choice.items())


def test_parameter_groups_and_generators_are_taken_as_torch_takes_them():
    model = vae()
    groups = [{"params": list(model.encoder.parameters())}, {"params": list(model.decoder.parameters()), "lr": 1e-4}]
    optimizer = GeneratorAdam(groups)
    assert optimizer.defaults["fused"] is True and [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-4]
    from_generator = FusedAdam(p for p in model.parameters())  # a generator: read once, all of it kept
    assert from_generator.defaults["fused"] is True
    assert [id(p) for p in from_generator.param_groups[0]["params"]] == [id(p) for p in model.parameters()]


@pytest.mark.parametrize(
    "precision, clip, fused", [("bf16-mixed", 1.0, False), ("bf16-mixed", None, True), ("32-true", 1.0, True)]
)
def test_the_default_is_fused_unless_its_gradients_are_clipped_under_mixed_precision(precision, clip, fused):
    # Lightning refuses to clip the gradients of an optimizer that unscales inside its step (a fused one), in bf16 too
    model = vae()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, precision=precision, gradient_clip_val=clip, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(images(16)), batch_size=8))
    assert trainer.global_step == 2 and trainer.optimizers[0].defaults["fused"] is fused


def test_recipes_that_set_adams_arguments_get_the_fused_kernel_too():
    # dcgan_fashion_mnist names Adam with DCGAN's betas for both networks, glow_checkerboard with its lr
    for recipe in ("dcgan_fashion_mnist", "glow_checkerboard"):
        cli = DGMCLI(args=["--config", recipe, "--trainer.logger", "false"], run=False)
        configs = cli.model.configure_optimizers()
        optimizers = [c["optimizer"] for c in configs] if isinstance(configs, list) else [configs["optimizer"]]
        assert all(type(o) is FusedAdam and o.defaults["fused"] is True for o in optimizers), recipe


def test_a_fused_optimizer_whose_gradients_would_be_clipped_under_mixed_precision_is_refused_before_training():
    # named, as the recipes name it: fused
    model = VAE(latent_dim=4, data_shape=(1, 8, 8), hidden_dims=[32], optimizer=FusedAdam)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, precision="bf16-mixed", gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"FusedAdam with fused=True.*--model.optimizer.init_args.fused false"):
        trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(images(16)), batch_size=8))
    assert trainer.global_step == 0
    unfused = VAE(latent_dim=4, data_shape=(1, 8, 8), hidden_dims=[32], optimizer=partial(FusedAdam, fused=False))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, precision="bf16-mixed", gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(unfused, train_dataloaders=DataLoader(TensorDataset(images(16)), batch_size=8))
    assert trainer.global_step == 1


def test_adam_on_the_command_line_is_still_torchs():
    # our class is not called Adam: jsonargparse would find two optimizers of that name and refuse both
    cli = DGMCLI(args=["--config", "vae_digits", "--model.optimizer", "Adam", "--trainer.logger", "false"], run=False)
    assert type(cli.model.configure_optimizers()["optimizer"]) is torch.optim.Adam
