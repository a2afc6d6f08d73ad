"""The VAE's objectives, priors and posteriors (issue 13) under DDP with 2 CPU processes: both ranks end with the
same finite weights. One subprocess runs every option in turn (DDP's launcher re-executes the script it runs)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import PRINT_IMPORTS, assert_imported_the_tree_under_test, tree_under_test_env

OPTIONS = {
    "iwae": ["--model.objective", "iwae", "--model.training_samples", "3"],
    "miwae": ["--model.objective", "miwae", "--model.training_samples", "4", "--model.miwae_groups", "2"],
    "piwae": ["--model.objective", "piwae", "--model.training_samples", "4", "--model.miwae_groups", "2"],
    "beta_tc": ["--model.objective", "beta_tc", "--model.beta", "4"],
    "mmd": ["--model.objective", "mmd", "--model.beta", "0"],
    "mixture": ["--model.prior", "mixture"],
    "vamp": ["--model.prior", "vamp", "--model.pseudo_inputs", "50", "--model.objective", "iwae",
             "--model.training_samples", "2"],
    "power_spherical": ["--model.posterior", "power_spherical"],
    "von_mises_fisher": ["--model.posterior", "von_mises_fisher", "--model.objective", "iwae",
                         "--model.training_samples", "2"],
}  # fmt: skip

# (recipe, flags) of runs beyond the VAE's options; the rvae recipe's free bits are a per-dimension floor of the
# ELBO's KL, which the iwae objective and the sphere's KL refuse
OTHER_FAMILIES = {
    "rvae_iwae": ["--config", "rvae_digits_rows", "--model.objective", "iwae", "--model.training_samples", "2",
                  "--model.free_bits", "0"],
    "rvae_power_spherical": ["--config", "rvae_digits_rows", "--model.posterior", "power_spherical",
                             "--model.free_bits", "0"],
    "flowvae_mixture": ["--config", "flowvae_digits", "--model.prior", "mixture"],
}  # fmt: skip

SCRIPT = """
import torch

from dgm_lightning.cli import main

if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, flags in {options!r}.items():
        recipe = [] if "--config" in flags else ["--config", "vae_digits"]
        cli = main(["fit", *recipe, *flags, "--trainer.strategy", "ddp", "--trainer.accelerator",
                    "cpu", "--trainer.devices", "2", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                    "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
                    "--trainer.logger", "false"])
        trainer = cli.trainer
        torch.save({{"params": torch.nn.utils.parameters_to_vector(cli.model.parameters()).detach(),
                    "val_elbo": trainer.callback_metrics["val/elbo"]}}, f"{{name}}_rank{{trainer.global_rank}}.pt")
"""


@pytest.mark.slow
def test_every_objective_and_posterior_trains_under_ddp_with_both_ranks_in_step(tmp_path):
    (tmp_path / "ddp_strategies.py").write_text(SCRIPT.format(options={**OPTIONS, **OTHER_FAMILIES}) + PRINT_IMPORTS)
    result = subprocess.run(
        [sys.executable, "ddp_strategies.py"], cwd=tmp_path, env=tree_under_test_env(OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert_imported_the_tree_under_test(result.stdout)
    for name in {**OPTIONS, **OTHER_FAMILIES}:
        ranks = [torch.load(tmp_path / f"{name}_rank{rank}.pt") for rank in (0, 1)]
        assert torch.equal(ranks[0]["params"], ranks[1]["params"]), name  # DDP kept the replicas equal
        assert ranks[0]["params"].isfinite().all() and ranks[0]["val_elbo"].isfinite(), name
        assert ranks[0]["val_elbo"] == ranks[1]["val_elbo"], name  # the epoch mean over both ranks' examples
