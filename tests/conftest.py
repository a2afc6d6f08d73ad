"""Shared fixtures: seeded RNGs, W&B kept offline and inside the test's temporary folder."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test: a fixed seed, its own working folder, and W&B offline (there is no server here)."""
    L.seed_everything(0, verbose=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    # the tests' tiny networks run fastest on one thread (more threads only add hand-off costs)
    torch.set_num_threads(1)
    yield
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()  # the next test's WandbLogger must start a run of its own
