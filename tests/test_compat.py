"""Each private API in dgm_lightning/compat.py still behaves as the module expects (a new release fails here)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from dgm_lightning.compat import (
    attached_trainer,
    cpu_has_bf16_matrix_units,
    drop_unset_wandb_anonymous,
    find_unused_parameters,
    is_batch_norm,
    logs_this_step,
    optuna_trial_id,
)


def test_wandb_logger_keeps_its_init_arguments_in_wandb_init_and_only_an_unset_anonymous_is_dropped(tmp_path):
    unset = WandbLogger(save_dir=str(tmp_path), offline=True)
    given = WandbLogger(save_dir=str(tmp_path), offline=True, anonymous=True)
    assert unset._wandb_init["anonymous"] is None and given._wandb_init["anonymous"] == "allow"
    drop_unset_wandb_anonymous(unset)
    drop_unset_wandb_anonymous(given)
    assert "anonymous" not in unset._wandb_init and given._wandb_init["anonymous"] == "allow"
    assert unset._wandb_init["dir"] == str(tmp_path)  # the rest is left as it was


def test_attached_trainer_is_none_until_a_trainer_takes_the_module():
    module = L.LightningModule()
    assert attached_trainer(module) is None
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    assert attached_trainer(module) is trainer


class _StepRecorder(L.Callback):
    """Records, at each training batch's end, whether the Trainer writes that step's logs."""

    def __init__(self):
        self.logged = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(logs_this_step(trainer))


def test_logs_this_step_follows_log_every_n_steps(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    recorder = _StepRecorder()
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=6, log_every_n_steps=3, callbacks=[recorder], logger=CSVLogger(tmp_path),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(BoringModel())
    # steps 0..5: Lightning writes after steps whose count (step + 1) is a multiple of 3
    assert recorder.logged == [False, False, True, False, False, True]


def test_find_unused_parameters_reaches_the_ddp_wrapper_arguments():
    strategy = DDPStrategy()
    assert "find_unused_parameters" not in strategy._ddp_kwargs
    find_unused_parameters(strategy)
    assert strategy._ddp_kwargs["find_unused_parameters"] is True


def test_is_batch_norm_knows_every_batch_norm_and_nothing_else():
    for layer in (nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3), nn.SyncBatchNorm(3), nn.LazyBatchNorm2d()):
        assert is_batch_norm(layer)
    for layer in (nn.LayerNorm(3), nn.InstanceNorm2d(3), nn.GroupNorm(1, 3), nn.Linear(3, 3)):
        assert not is_batch_norm(layer)


def test_an_optuna_trials_storage_id_rebuilds_the_trial_in_another_process_s_study():
    optuna = pytest.importorskip("optuna")
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    study.ask()
    trial = study.ask()  # the second: its id and number could differ in another storage
    same_study = optuna.load_study(study_name=study.study_name, storage=storage)
    assert optuna.trial.Trial(same_study, optuna_trial_id(trial)).number == trial.number == 1


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_cpu_has_bf16_matrix_units_agrees_with_the_kernels_cpu_flags():
    flags = {word for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for word in line.split(":", 1)[1].split()}  # fmt: skip
    assert cpu_has_bf16_matrix_units() == ("amx_bf16" in flags)
