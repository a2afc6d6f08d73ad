"""Every family through its own recipe and train.py: resume parity, determinism, bf16-mixed, checkpoint errors.

Each recipe is shrunk to a few batches (SMALL) and run in this process with ``main([...])``.
"""

from __future__ import annotations

import copy
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import default_collate

from dgm_lightning import VAE
from dgm_lightning.cli import DGMCLI, main

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
RECIPES = {
    "ae": "ae_digits",
    "vae": "vae_digits",
    "gan": "dcgan_digits",
    "flow": "glow_digits",
    "flowvae": "flowvae_digits",
    "rvae": "rvae_digits_rows",
    "classifier": "classifier_digits",
    "vqvae": "vqvae_digits",
}
SMALL = [
    "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2", "--trainer.logger", "false",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip
# a scheduler too, so that its state is part of what a resume must restore; the GAN steps its own
SCHEDULER = [
    "--model.lr_scheduler",
    "StepLR",
    "--model.lr_scheduler.step_size",
    "1",
    "--model.lr_scheduler.gamma",
    "0.5",
]
GAN_SCHEDULER = ["--model.lr_scheduler_g", "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler_g.step_size", "1"]


def fit(family: str, root: Path, *flags: str):
    scheduler = GAN_SCHEDULER if family == "gan" else SCHEDULER
    config = str(CONFIGS / f"{RECIPES[family]}.yaml")
    return main(["fit", "--config", config, *SMALL, *scheduler, "--trainer.default_root_dir", str(root), *flags])


def last_of(cli) -> Path:
    """The run's last.ckpt: every run has a folder of its own, <root>/dgm-lightning/<run id>/checkpoints."""
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same(a, b, where: str = "checkpoint") -> None:
    """Equal checkpoint contents: tensors bitwise, containers entry by entry (the first difference is named)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def training_state(checkpoint: dict) -> dict:
    """What a resume must restore: everything but the checkpoint callback's own file names."""
    callbacks = {k: v for k, v in checkpoint["callbacks"].items() if not k.startswith("ModelCheckpoint")}
    return {**{k: v for k, v in checkpoint.items() if k != "callbacks"}, "callbacks": callbacks}


@pytest.mark.parametrize("family", RECIPES)
def test_resume_and_a_second_seeded_run_reproduce_an_uninterrupted_run(family, tmp_path):
    """2 epochs straight, again (bitwise determinism), and 1 epoch + resume: weights, optimizer, scheduler,
    schedule callbacks, EMA and counters all equal."""
    straight_run = fit(family, tmp_path / "straight", "--trainer.max_epochs", "2")
    again = fit(family, tmp_path / "again", "--trainer.max_epochs", "2")
    first = fit(family, tmp_path / "resumed", "--trainer.max_epochs", "1")
    torch.manual_seed(123)  # whatever the random state before resuming, the checkpoint restores it
    resumed = fit(family, tmp_path / "resumed", "--trainer.max_epochs", "2", "--ckpt_path", str(last_of(first)))
    straight = training_state(load(last_of(straight_run)))
    assert straight["global_step"] > 0 and straight["lr_schedulers"]
    assert_same(straight, training_state(load(last_of(again))))
    assert_same(straight, training_state(load(last_of(resumed))))  # the resumed run's own folder


class LayerOutputDtypes(Callback):
    """The dtypes of what each linear and convolution layer returns in training, and the weights at the start."""

    LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)

    def __init__(self) -> None:
        self.dtypes: dict[str, set[torch.dtype]] = {}
        self.initial: dict[str, Tensor] = {}
        self.handles: list = []

    def on_train_start(self, trainer, pl_module) -> None:
        # here, not before fit: some models build their networks from the data in setup
        self.initial = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        for name, module in pl_module.named_modules():
            if isinstance(module, self.LAYERS):
                self.handles.append(module.register_forward_hook(functools.partial(self.record, name, trainer)))

    def record(self, name: str, trainer, module, inputs, output: Tensor) -> None:
        if trainer.training:  # not the validation steps
            self.dtypes.setdefault(name, set()).add(output.dtype)

    def on_train_end(self, trainer, pl_module) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("family", RECIPES)
def test_every_family_trains_in_bf16_mixed_precision(family, tmp_path):
    config = str(CONFIGS / f"{RECIPES[family]}.yaml")
    flags = ["--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed"]
    cli = DGMCLI(args=["--config", config, *SMALL, *flags, "--trainer.default_root_dir", str(tmp_path)], run=False)
    layers = LayerOutputDtypes()
    cli.trainer.callbacks.append(layers)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # the layers ran in bfloat16 (the recurrent layers run in float32 on the CPU, see nets/sequence_nets.py) ...
    assert layers.dtypes and all(dtypes == {torch.bfloat16} for dtypes in layers.dtypes.values()), layers.dtypes
    networks = {name for name, net in cli.model.named_children() if any(True for _ in net.parameters())} - {"ema"}
    assert networks == {name.split(".")[0] for name in layers.dtypes}  # every network took part (EMA: no step)
    losses = {k: v for k, v in cli.trainer.callback_metrics.items() if k.startswith("train/") and "loss" in k}
    assert losses and all(value.isfinite() for value in losses.values()), losses
    # ... while the weights stay float32 (mixed precision) and trained
    for name, param in cli.model.named_parameters():
        assert param.dtype == torch.float32 and param.isfinite().all(), name
    initial = layers.initial
    moved = [name for name, param in cli.model.named_parameters() if not torch.equal(param, initial[name])]
    assert len(moved) > len(initial) // 4, moved


class StatesAroundBatches(Callback):
    """Copies of the model's state_dict (weights and buffers) and the optimizers' states around each training batch."""

    def __init__(self) -> None:
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    @staticmethod
    def copy(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return {
            "state_dict": {name: value.detach().clone() for name, value in pl_module.state_dict().items()},
            "optimizers": copy.deepcopy([optimizer.state_dict() for optimizer in trainer.optimizers]),
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.before[batch_idx] = self.copy(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.after[batch_idx] = self.copy(trainer, pl_module)


@pytest.mark.parametrize("family", RECIPES)
def test_a_nan_batch_is_skipped_by_every_family_without_touching_the_weights(family, tmp_path):
    """The divergence policy: the second batch holds a NaN; its step is skipped, the others train."""
    config = str(CONFIGS / f"{RECIPES[family]}.yaml")
    cli = DGMCLI(args=["--config", config, *SMALL, "--trainer.max_epochs", "1"], run=False)
    collate, batches = cli.datamodule.collate_fn or default_collate, []

    def second_batch_nan(examples):  # called for every loader: count the training batches only
        batch = collate(examples)
        batches.append(batch) if cli.trainer.training else None
        if cli.trainer.training and len(batches) == 2:
            batch[0].view(-1)[0] = float("nan")
        return batch

    cli.datamodule.collate_fn = second_batch_nan
    states = StatesAroundBatches()
    cli.trainer.callbacks.append(states)
    with pytest.warns(UserWarning, match="skipping a training step with non-finite loss terms"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(batches) == 3 and sorted(states.before) == sorted(states.after) == [0, 1, 2]
    before, after = states.before[1], states.after[1]
    # the skipped step leaves every weight (EMA included) and the optimizers' states bitwise as they were
    parameters = {name for name, _ in cli.model.named_parameters()}
    weights = lambda state: {k: v for k, v in state["state_dict"].items() if k in parameters or "ema" in k}  # noqa: E731
    assert_same(weights(before), weights(after), "weights around the NaN batch")
    assert_same(before["optimizers"], after["optimizers"], "optimizer states around the NaN batch")
    # and the finite steps around it train: a test that could not see a step at all would pass the lines above
    for batch_idx in (0, 2):
        start, end = weights(states.before[batch_idx]), weights(states.after[batch_idx])
        assert any(not torch.equal(value, end[name]) for name, value in start.items()), batch_idx
    # the buffers too (batch norm statistics): NaN running statistics would make every later evaluation NaN
    moved = [k for k, v in before["state_dict"].items() if not torch.equal(v, after["state_dict"][k])]
    assert not moved, moved
    assert all(param.isfinite().all() for param in cli.model.parameters())  # a NaN step would spread NaN


@pytest.mark.parametrize("family", RECIPES)
def test_a_nan_in_evaluation_data_is_named(family, tmp_path):
    cli = DGMCLI(args=["--config", str(CONFIGS / f"{RECIPES[family]}.yaml"), *SMALL], run=False)
    collate = cli.datamodule.collate_fn or default_collate

    def with_nan(examples):
        batch = collate(examples)
        batch[0].view(-1)[0] = float("nan")
        return batch

    cli.datamodule.collate_fn = with_nan
    with pytest.raises(ValueError, match="a batch to evaluate holds NaN or Inf values"):
        cli.trainer.validate(cli.model, datamodule=cli.datamodule)


@pytest.mark.parametrize("family", RECIPES)
def test_a_non_positive_learning_rate_or_size_is_named_by_every_family(family):
    sizes = {"flow": "--model.num_steps", "classifier": "--model.feature_dim", "vqvae": "--model.num_embeddings"}
    size = sizes.get(family, "--model.latent_dim")
    with pytest.raises(ValueError, match="must be (> 0|a positive integer)"):
        DGMCLI(args=["--config", str(CONFIGS / f"{RECIPES[family]}.yaml"), size, "0"], run=False)
    # the optimizer is built when training starts, on the model's parameters: refused then, before any step
    optimizer = "--model.optimizer_d" if family == "gan" else "--model.optimizer"
    with pytest.raises(ValueError, match=rf"builds Adam with lr 0.0, which would train nothing.*{optimizer}.lr"):
        fit(family, Path.cwd(), optimizer, "Adam", f"{optimizer}.lr", "0", "--trainer.fast_dev_run", "1")


def test_the_node_count_goes_to_the_trainer_as_given():
    """Multi-node runs are Lightning's (torchrun, SLURM): the command line only has to pass the shape on."""
    cli = DGMCLI(args=["--config", str(CONFIGS / "vae_digits.yaml"), "--trainer.num_nodes", "2"], run=False)
    assert cli.trainer.num_nodes == 2


# -- checkpoints: bad ones are refused before anything is written; a killed run resumes ----------------------


def test_a_checkpoint_with_other_settings_or_of_another_model_is_refused_and_left_intact(tmp_path):
    last = last_of(fit("vae", tmp_path, "--trainer.max_epochs", "1"))
    saved = last.read_bytes()
    resume = ["--trainer.max_epochs", "2", "--ckpt_path", str(last)]
    with pytest.raises(ValueError, match=r"latent_dim: 8 in the checkpoint, 4 configured.*leave out --ckpt_path"):
        fit("vae", tmp_path, "--model.latent_dim", "4", *resume)
    with pytest.raises(ValueError, match=r"model: dgm_lightning.VAE in the checkpoint, dgm_lightning.AE configured"):
        fit("ae", tmp_path, *resume)
    assert last.read_bytes() == saved


def test_a_missing_truncated_or_foreign_checkpoint_is_named_before_training(tmp_path):
    whole = last_of(fit("vae", tmp_path / "run", "--trainer.max_epochs", "1")).read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.ckpt")
    for name, message in [
        ("missing.ckpt", "no such file"),
        ("truncated.ckpt", "not a readable checkpoint .* truncated"),
        ("foreign.ckpt", "not a checkpoint of a dgm-lightning model"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            fit("vae", tmp_path / "new", "--ckpt_path", str(tmp_path / name))
    assert not (tmp_path / "new").exists()  # refused before any run folder was made


def test_a_run_killed_mid_training_leaves_a_loadable_checkpoint_and_ckpt_path_last_resumes_it(tmp_path):
    """SIGKILL while a W&B-logged run saves a checkpoint every epoch (Lightning writes them atomically)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(CONFIGS / "vae_digits.yaml"),
               "--trainer.max_epochs", "1000", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    run = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(list(tmp_path.glob("runs/*/*/checkpoints/last.ckpt"))) == 0:
            assert run.poll() is None, run.stderr.read()[-3000:]
            time.sleep(0.2)
        time.sleep(2.0)  # a few more epochs: the kill lands at an arbitrary point of a later one
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    (last,) = tmp_path.glob("runs/*/*/checkpoints/last.ckpt")
    VAE.load_from_checkpoint(last, weights_only=True)
    saved = load(last)
    cli = main(["fit", "--config", str(CONFIGS / "vae_digits.yaml"), "--ckpt_path", "last",
                "--trainer.max_epochs", str(saved["epoch"] + 2), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert cli.trainer.global_step == saved["global_step"] + cli.trainer.num_training_batches  # one epoch more


# -- torch.compile --------------------------------------------------------------------------------------------


def compiled_and_plain_runs(tmp_path: Path) -> tuple:
    plain = fit("vae", tmp_path / "plain", "--trainer.max_epochs", "1")
    compiled = fit("vae", tmp_path / "compiled", "--trainer.max_epochs", "1", "--model.compile", "true")
    return plain.model, compiled.model


def assert_compiled_like_plain(plain, compiled) -> None:
    assert compiled.encoder._compiled_call_impl is not None and plain.encoder._compiled_call_impl is None
    plain_state, compiled_state = plain.state_dict(), compiled.state_dict()
    assert plain_state.keys() == compiled_state.keys()  # compiled in place: checkpoints interchange
    for name, value in plain_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_option_compiles_the_networks_in_place_and_trains_like_eager(tmp_path, monkeypatch):
    """Through TorchDynamo with the aot_eager backend: the whole path but inductor's C++ build (slow test below)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    assert_compiled_like_plain(*compiled_and_plain_runs(tmp_path))


@pytest.mark.slow
def test_compile_option_with_inductor(tmp_path):
    """The default backend: inductor builds C++ kernels on the CPU (about a minute on 2 cores)."""
    assert_compiled_like_plain(*compiled_and_plain_runs(tmp_path))
