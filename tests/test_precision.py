"""The default precision: bf16-mixed where it measured faster (a model with convolutions on a CPU with bfloat16
matrix units), 32-true elsewhere; train.py resolves ``auto`` by its model and records what it trained in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from torch import nn

import dgm_lightning.precision as precision
from dgm_lightning.cli import DGMCLI, Trainer, main
from dgm_lightning.precision import default_precision
from tests.helpers import wandb_records

CONV = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
TRANSPOSED = nn.Sequential(nn.Linear(4, 16), nn.Unflatten(1, (1, 4, 4)), nn.ConvTranspose2d(1, 1, 3))
MLP = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]  # fmt: skip


@pytest.fixture(params=[True, False], ids=["amx", "no-amx"])
def amx(request, monkeypatch):
    """This CPU with and without bfloat16 matrix units, as the precision rule sees it."""
    monkeypatch.setattr(precision, "cpu_has_bf16_matrix_units", lambda: request.param)
    return request.param


def test_bf16_mixed_only_for_convolutions_on_a_cpu_with_bf16_matrix_units(amx, monkeypatch):
    assert default_precision(CONV, "cpu") == ("bf16-mixed" if amx else "32-true")
    assert default_precision(TRANSPOSED, "cpu") == default_precision(CONV, "cpu")
    assert default_precision(CONV, CPUAccelerator()) == default_precision(CONV, "cpu")
    assert default_precision(MLP, "cpu") == "32-true"  # MLPs trained no faster in bf16
    for gpu in ("gpu", "cuda", CUDAAccelerator()):  # not measured yet
        assert default_precision(CONV, gpu) == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_precision(CONV) == default_precision(CONV, "cpu")  # "auto" is the CPU where there is no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_precision(CONV) == "32-true"


@pytest.mark.parametrize("recipe, convolutional", [("dcgan_digits", True), ("vae_digits", False)])
def test_train_py_resolves_auto_by_its_model_and_an_explicit_precision_stays(recipe, convolutional, amx, tmp_path):
    args = ["--config", recipe, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    cli = DGMCLI(args=args, run=False)
    expected = "bf16-mixed" if amx and convolutional else "32-true"
    assert cli.trainer.precision == expected
    assert cli.config.trainer.precision == expected  # what the run's config.yaml records
    assert DGMCLI(args=[*args, "--trainer.precision", "32-true"], run=False).trainer.precision == "32-true"


def test_the_run_records_the_resolved_precision_and_its_config_reproduces_it_elsewhere(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_matrix_units", lambda: True)
    main(["fit", "--config", "dcgan_digits", *QUICK])
    (config_file,) = Path("runs").rglob("config.yaml")
    assert yaml.safe_load(config_file.read_text())["trainer"]["precision"] == "bf16-mixed"
    (wandb_run,) = Path("runs").rglob("offline-run-*")
    (config,) = [item.value_json for record in wandb_records(wandb_run) if record.WhichOneof("record_type") == "config"
                 for item in record.config.update if item.key == "config"]  # fmt: skip
    assert json.loads(config)["trainer"]["precision"] == "bf16-mixed"
    # on a machine without AMX, the run's config.yaml still trains in what the run trained in
    monkeypatch.setattr(precision, "cpu_has_bf16_matrix_units", lambda: False)
    rerun = main(["fit", "--config", str(config_file), *QUICK, "--trainer.logger", "false"])
    assert rerun.trainer.precision == "bf16-mixed"


def test_a_trainer_built_in_python_refuses_auto_and_names_the_fix():
    with pytest.raises(ValueError, match=r"default_precision\(model\)"):
        Trainer(precision="auto", logger=False)
    assert Trainer(precision="32-true", logger=False).precision == "32-true"
