"""GAN under multi-process DDP (2 CPU processes, gloo), with no find_unused_parameters from the user.

DDP's launcher re-executes the script it finds in sys.argv, so every run here is a subprocess (a written
script, or train.py), never Trainer(strategy="ddp") inside the pytest process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import PRINT_IMPORTS, assert_imported_the_tree_under_test, tree_under_test_env

REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from dgm_lightning import GAN


class RecordingGAN(GAN):
    '''Remembers the first coordinate of every latent batch drawn in training.'''

    noise_seen = []

    def latent(self, n, noise=None):
        z = super().latent(n, noise)
        if noise is not None:
            self.noise_seen.append(z[0, 0].item())
        return z


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    model = RecordingGAN(data_shape=(2,), architecture="mlp", hidden_dims=[16], latent_dim=4, loss="wasserstein",
                         gp_weight=1.0, n_critic=2, ema_decay=0.9)
    initial = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    data = DataLoader(TensorDataset(torch.rand(256, 2) * 2 - 1), batch_size=32)  # the default value_range (-1, 1)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    torch.save({"initial": initial, "params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(),
                "noise": model.noise_seen, "global_step": trainer.global_step}, f"rank{trainer.global_rank}.pt")
"""


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = tree_under_test_env(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_a_plain_ddp_script_trains_with_identical_weights_and_different_noise_per_rank(tmp_path):
    (tmp_path / "ddp_gan.py").write_text(SCRIPT + PRINT_IMPORTS)
    result = run([sys.executable, "ddp_gan.py"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_imported_the_tree_under_test(result.stdout)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # 6 optimizer steps = 2 batches of 2 critic steps + 1 generator step
    assert rank0["global_step"] == rank1["global_step"] == 6
    assert not torch.equal(rank0["params"], rank0["initial"])  # it trained
    assert torch.equal(rank0["initial"], rank1["initial"])
    assert torch.equal(rank0["params"], rank1["params"])  # generator, critic and EMA all in step
    assert len(rank0["noise"]) == len(rank1["noise"]) == 6  # 2 batches x (2 critic + 1 generator draws)
    assert all(a != b for a, b in zip(rank0["noise"], rank1["noise"], strict=True))


def test_a_gan_recipe_trains_under_ddp_from_the_command_line(tmp_path):
    result = run(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "hinge_sn_digits.yaml"),
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = tmp_path.glob("dgm-lightning/*/checkpoints/last.ckpt")  # one run folder, whatever the ranks
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] == 4 and state["gan_counters"]["batches_seen"] == 2
