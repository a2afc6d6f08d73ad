"""The private APIs of Lightning, its loggers, torch and Optuna that dgm-lightning relies on, in one place, each
covered by a test (tests/test_compat.py) so that a release that changes one fails there, by name."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn


def drop_unset_wandb_anonymous(logger: WandbLogger) -> None:
    """Stop WandbLogger from passing ``anonymous=None`` to ``wandb.init``, which recent wandb releases answer with
    "The anonymous setting has no effect and will be removed" on every run. WandbLogger keeps its ``wandb.init``
    arguments in the private ``_wandb_init``; only an unset value (None) is dropped, so ``anonymous=True`` is
    still passed on. Call before the run starts (before the first use of ``logger.experiment``)."""
    if logger._wandb_init.get("anonymous", "set") is None:
        del logger._wandb_init["anonymous"]


def restricted_classmethod(method):
    """Lightning's ``classmethod`` that refuses a call on an instance, such as ``model.load_from_checkpoint(path)``,
    whose loaded model would be dropped: ``LightningModule.load_from_checkpoint`` is one, so an override keeps that
    guard with it. Private in ``lightning.pytorch.utilities.model_helpers``."""
    from lightning.pytorch.utilities.model_helpers import _restricted_classmethod

    return _restricted_classmethod(method)


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer a module is attached to, or None: ``module.trainer`` raises when there is none, and Lightning has
    no public test for it; the private ``_trainer`` attribute is that test."""
    return module._trainer


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether the Trainer writes this training step's logged values to its loggers (every ``log_every_n_steps``
    steps, the last step of a run, every step of ``fast_dev_run``): the logger connector's own test, private."""
    return trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run)


def find_unused_parameters(strategy: DDPStrategy) -> None:
    """Make a DDP strategy wrap the model with ``find_unused_parameters=True``. DDPStrategy takes it as a constructor
    argument only and keeps it in the private ``_ddp_kwargs``, which it reads when it wraps the model, after the
    model's ``setup``; so a model can set it from ``setup``."""
    strategy._ddp_kwargs["find_unused_parameters"] = True


def is_batch_norm(module: nn.Module) -> bool:
    """Whether a module is a batch-norm layer of any dimension (lazy and synchronised ones included): torch's common
    base class of them, ``_BatchNorm``, is private."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def optuna_trial_id(trial) -> int:
    """The storage's id of an Optuna trial (not its number within the study), by which a trial's own process rebuilds
    it, ``optuna.trial.Trial(study, trial_id)``, to report to it: Optuna keeps it in the private ``_trial_id``.
    (``trial``: an ``optuna.Trial``; Optuna is an optional dependency, so it is not imported here.)"""
    return trial._trial_id


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX-BF16: Sapphire Rapids and later), where
    oneDNN runs bf16 convolutions natively; elsewhere it emulates them. torch reads the CPU's features into the
    private ``torch._C._cpu._get_cpu_capability()``; ``torch.backends.cpu.get_cpu_capability()`` only names the
    vector width ("AVX512" on such a CPU too)."""
    import torch

    return bool(torch._C._cpu._get_cpu_capability().get("amx_bf16", False))
