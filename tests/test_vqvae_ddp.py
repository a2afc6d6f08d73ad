"""The VQ-VAE's codebook under DDP with 2 CPU processes (gloo): k-means initialisation, EMA statistics and dead-code
restarts reduced across ranks, so both ranks end with the same codebook although each saw other batches; then its
prior trains under DDP with both ranks in step and the frozen VQ-VAE untouched.

DDP's launcher re-executes the script it runs, so the runs happen in one subprocess. DDP is told not to broadcast
buffers (broadcast_buffers=False): by default it copies rank zero's buffers to every rank before each forward,
which would hide a codebook kept per rank; here only the quantiser's own reductions can keep the ranks equal.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import PRINT_IMPORTS, assert_imported_the_tree_under_test, tree_under_test_env

SCRIPT = """
import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from dgm_lightning import VQVAE, VQVAEPrior


class LastBatch(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images = batch[0].detach().clone()


if __name__ == "__main__":
    torch.set_num_threads(1)
    for update in ("ema", "loss"):
        L.seed_everything(0)
        x = torch.rand(96, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        model = VQVAE(16, 4, data_shape=(1, 8, 8), hidden_dims=[8], residual_channels=4, codebook_update=update,
                      dead_code_threshold=4.0)  # 128 vectors a batch for 16 codes: some fall below 4 and restart
        last = LastBatch()
        trainer = L.Trainer(
            strategy=DDPStrategy(process_group_backend="gloo", broadcast_buffers=False), accelerator="cpu", devices=2,
            max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[last],
        )
        trainer.fit(model, DataLoader(TensorDataset(x), batch_size=8, shuffle=True))
        quantizer = model.quantizer
        torch.save({
            "state": {k: v.detach().clone() for k, v in quantizer.state_dict().items()},
            "params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(),
            "usage": trainer.callback_metrics["train/codebook_usage"],
            "perplexity": trainer.callback_metrics["train/codebook_perplexity"],
            "last_images": last.images,
        }, f"{update}_rank{trainer.global_rank}.pt")
    # the second stage on the trained VQ-VAE: the frozen VQ-VAE's parameters are no DDP parameters
    L.seed_everything(0)
    prior = VQVAEPrior(vqvae=model, channels=8, num_layers=2)
    vqvae_before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    trainer = L.Trainer(strategy=DDPStrategy(process_group_backend="gloo"), accelerator="cpu", devices=2, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(prior, DataLoader(TensorDataset(x), batch_size=8, shuffle=True))
    torch.save({"params": torch.nn.utils.parameters_to_vector(prior.prior.parameters()).detach(),
                "vqvae_moved": not torch.equal(vqvae_before, torch.nn.utils.parameters_to_vector(model.parameters())),
                "loss": trainer.callback_metrics["train/loss"]}, f"prior_rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_the_codebook_and_its_statistics_agree_across_two_ddp_processes(tmp_path):
    (tmp_path / "ddp_vqvae.py").write_text(SCRIPT + PRINT_IMPORTS)
    result = subprocess.run(
        [sys.executable, "ddp_vqvae.py"], cwd=tmp_path, env=tree_under_test_env(OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert_imported_the_tree_under_test(result.stdout)
    for update in ("ema", "loss"):
        ranks = [torch.load(tmp_path / f"{update}_rank{rank}.pt") for rank in (0, 1)]
        assert not torch.equal(ranks[0]["last_images"], ranks[1]["last_images"]), update  # each rank its own data
        state = [r["state"] for r in ranks]
        assert bool(state[0]["initialized"]) and bool(state[1]["initialized"]), update
        for name in state[0]:  # codebook, EMA counts (and sums), usage: the same on both ranks
            assert torch.equal(state[0][name], state[1][name]), (update, name)
        assert torch.equal(ranks[0]["params"], ranks[1]["params"]), update
        assert ranks[0]["params"].isfinite().all() and state[0]["codebook"].isfinite().all(), update
        # the epoch's usage and perplexity count both ranks' codes: every rank logs the same values
        assert ranks[0]["usage"] == ranks[1]["usage"] and ranks[0]["perplexity"] == ranks[1]["perplexity"], update
        assert 0 < ranks[0]["usage"] <= 1, update
    priors = [torch.load(tmp_path / f"prior_rank{rank}.pt") for rank in (0, 1)]
    assert torch.equal(priors[0]["params"], priors[1]["params"]) and priors[0]["params"].isfinite().all()
    assert not priors[0]["vqvae_moved"] and priors[0]["loss"] == priors[1]["loss"]
