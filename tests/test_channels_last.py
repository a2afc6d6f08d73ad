"""channels_last (GenerativeModel): channels-last weights while the Trainer runs, contiguous before and after,
the same training as contiguous weights up to float rounding."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dgm_lightning import GAN, VAE, Classifier

from .helpers import images, trainer


class WeightLayouts(L.Callback):
    """Whether every 4-D weight is channels-last, seen at each training step."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        weights = [p for p in pl_module.parameters() if p.dim() == 4]
        assert weights, "the model under test has convolutions"
        self.seen.append(all(p.is_contiguous(memory_format=torch.channels_last) for p in weights))


def conv_vae(channels_last: bool) -> VAE:
    L.seed_everything(0, verbose=False)
    return VAE(4, data_shape=(1, 16, 16), architecture="conv", hidden_dims=[8, 16], channels_last=channels_last)


def fit(model: L.LightningModule, steps: int = 2, callbacks=()) -> L.LightningModule:
    data = DataLoader(TensorDataset(images(16, (1, 16, 16)), torch.zeros(16, dtype=torch.long)), batch_size=8)
    trainer(max_epochs=1, limit_train_batches=steps, callbacks=list(callbacks)).fit(model, data)
    return model


def weights_contiguous(model: torch.nn.Module) -> bool:
    return all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("channels_last", [True, False])
def test_weights_are_channels_last_only_while_the_trainer_runs(channels_last):
    model, layouts = conv_vae(channels_last), WeightLayouts()
    assert weights_contiguous(model)
    fit(model, callbacks=[layouts])
    assert layouts.seen == [channels_last] * 2
    assert weights_contiguous(model)  # after fit: flat views work again
    torch.nn.utils.parameters_to_vector(model.parameters())
    for param, state in model.trainer.optimizers[0].state.items():  # and the moments have the weights' layout
        assert all(v.stride() == param.stride() for v in state.values() if v.shape == param.shape)


def test_channels_last_trains_like_contiguous_weights():
    fast, plain = fit(conv_vae(True)), fit(conv_vae(False))
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    untrained = torch.nn.utils.parameters_to_vector(conv_vae(True).parameters())
    assert not torch.equal(torch.nn.utils.parameters_to_vector(fast.parameters()), untrained)  # it did train


@pytest.mark.parametrize(
    "build",
    [
        lambda: GAN(8, data_shape=(1, 16, 16), architecture="dcgan", hidden_dims=[8, 16]),
        lambda: Classifier(10, data_shape=(1, 16, 16), feature_dim=8, hidden_dims=(8, 16)),
    ],
    ids=["GAN", "Classifier"],
)
def test_every_convolutional_family_is_channels_last_in_training(build):
    layouts = WeightLayouts()
    model = fit(build(), steps=2, callbacks=[layouts])
    assert layouts.seen == [True, True] and weights_contiguous(model)


def test_a_model_loaded_from_a_checkpoint_is_contiguous(tmp_path):
    model = fit(conv_vae(True))
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": L.__version__}, path)  # fmt: skip
    loaded = VAE.load_from_checkpoint(path)  # calls configure_model, with no Trainer
    assert weights_contiguous(loaded)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


class SaveEveryStep(L.Callback):
    """A checkpoint after every training step."""

    def __init__(self, folder) -> None:
        self.paths = [folder / f"step{i}.ckpt" for i in range(2)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.save_checkpoint(self.paths[batch_idx])


def test_checkpoints_hold_contiguous_optimizer_states_and_leave_the_live_ones_alone(tmp_path):
    saving = SaveEveryStep(tmp_path)
    saved, plain = fit(conv_vae(True), steps=2, callbacks=[saving]), fit(conv_vae(True), steps=2)
    # saving in between changed nothing: fused Adam steps each weight with its own moments
    torch.testing.assert_close(saved.state_dict(), plain.state_dict(), rtol=0, atol=0)
    for path in saving.paths:
        for state in torch.load(path, weights_only=True)["optimizer_states"][0]["state"].values():
            assert all(v.is_contiguous() for v in state.values() if torch.is_tensor(v))


def test_a_resumed_run_steps_channels_last_weights_with_moments_of_their_layout(tmp_path):
    # the checkpoint's moments are contiguous, the resumed weights channels-last: fused Adam, which steps both as
    # flat memory, would give each entry another entry's moments unless the moments follow the weights' layout
    first = fit(conv_vae(True))
    path = tmp_path / "first.ckpt"
    first.trainer.save_checkpoint(path)
    runs = []
    for channels_last in (True, False):
        model = conv_vae(channels_last)
        model.hparams["channels_last"] = True  # the checkpoint's settings, so that the resume is allowed
        data = DataLoader(TensorDataset(images(16, (1, 16, 16)), torch.zeros(16, dtype=torch.long)), batch_size=8)
        trainer(max_epochs=2).fit(model, data, ckpt_path=path)
        runs.append(model)
    torch.testing.assert_close(runs[0].state_dict(), runs[1].state_dict(), rtol=1e-4, atol=1e-5)
