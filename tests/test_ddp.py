"""Every family's recipe under DDP with 2 CPU processes (gloo), from train.py's main with the default W&B logger.

DDP's launcher re-executes the script it finds in sys.argv, so the runs happen in one subprocess (a written
script that fits every recipe in turn), never with strategy="ddp" inside the pytest process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import PRINT_IMPORTS, assert_imported_the_tree_under_test, tree_under_test_env
from tests.test_families import CONFIGS, RECIPES

SCRIPT = """
import sys

import torch

from dgm_lightning.cli import main

if __name__ == "__main__":
    torch.set_num_threads(1)
    for family, recipe in {recipes!r}.items():
        # the recipes draw images every 10 epochs; these runs have one
        images = [] if family == "classifier" else ["--trainer.callbacks+=callbacks.ImageLogger",
                                                    "--trainer.callbacks.every_n_epochs", "1"]
        cli = main(["fit", "--config", f"{configs}/{{recipe}}.yaml", "--trainer.strategy", "ddp",
                    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
                    "--trainer.enable_progress_bar", "false", "--trainer.logger.save_dir", family, *images])
        trainer = cli.trainer
        torch.save({{"params": torch.nn.utils.parameters_to_vector(cli.model.parameters()).detach(),
                    "metrics": {{k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}},
                    "step": trainer.global_step, "next_noise": torch.rand(4)}},
                   f"{{family}}_rank{{trainer.global_rank}}.pt")
"""


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    (folder / "ddp_families.py").write_text(SCRIPT.format(recipes=RECIPES, configs=CONFIGS) + PRINT_IMPORTS)
    env = tree_under_test_env(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop("WANDB_DIR", None)  # W&B writes beside each run, under its logger's save_dir
    result = subprocess.run(
        [sys.executable, "ddp_families.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert_imported_the_tree_under_test(result.stdout, packages=("dgm_lightning", "datamodules", "callbacks"))
    return folder


LOAD_SCRIPT = """
import sys

import torch

import dgm_lightning

for family in sys.argv[1:]:
    (path,) = __import__("pathlib").Path(family).glob("dgm-lightning/*/checkpoints/last.ckpt")
    name = torch.load(path, weights_only=True)["hyper_parameters"]["_class_path"].rsplit(".", 1)[-1]
    model = getattr(dgm_lightning, name).load_from_checkpoint(path, weights_only=True)
    torch.save(torch.nn.utils.parameters_to_vector(model.parameters()).detach(), f"{family}_loaded.pt")
"""


def test_every_familys_checkpoint_loads_in_a_fresh_process_with_weights_only(ddp_runs):
    (ddp_runs / "load.py").write_text(LOAD_SCRIPT + PRINT_IMPORTS)
    result = subprocess.run(
        [sys.executable, "load.py", *RECIPES], cwd=ddp_runs, env=tree_under_test_env(), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_imported_the_tree_under_test(result.stdout)
    for family in RECIPES:
        trained = torch.load(ddp_runs / f"{family}_rank0.pt", weights_only=False)["params"]
        assert torch.equal(torch.load(ddp_runs / f"{family}_loaded.pt"), trained), family


@pytest.mark.parametrize("family", RECIPES)
def test_every_family_trains_under_ddp_with_ranks_in_step_and_metrics_reduced(family, ddp_runs):
    rank0, rank1 = (torch.load(ddp_runs / f"{family}_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["step"] == rank1["step"] > 0
    assert torch.equal(rank0["params"], rank1["params"])
    assert not torch.equal(rank0["next_noise"], rank1["next_noise"])  # each rank draws its own noise
    # each rank validated on its own half of the data: equal values mean they were reduced over both halves
    assert rank0["metrics"] and rank0["metrics"].keys() == rank1["metrics"].keys()
    for name, value in rank0["metrics"].items():
        assert torch.equal(value, rank1["metrics"][name]), name


@pytest.mark.parametrize("family", RECIPES)
def test_only_rank_zero_writes_the_run(family, ddp_runs):
    """One W&B run, one run folder with one config, one set of checkpoints and images."""
    root = ddp_runs / family
    assert len(list(root.glob("wandb/offline-run-*"))) == 1
    (run,) = root.glob("dgm-lightning/*")
    assert [p.name for p in run.glob("**/config.yaml")] == ["config.yaml"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    if family not in ("rvae", "classifier"):  # the models that draw images
        assert list(run.glob("**/*.png"))


RESUME_RANK_SCRIPT = """
from types import SimpleNamespace

import torch

from dgm_lightning import VAE

model = VAE(latent_dim=2, data_shape=(1, 8, 8), hidden_dims=[8])
states = []
for seed in (0, 1):  # as a checkpoint holds them: one row per rank, gathered
    torch.manual_seed(seed)
    states.append(torch.get_rng_state())
model._trainer = SimpleNamespace(global_rank=1)  # the second rank of a resumed DDP run
model.on_load_checkpoint({"hyper_parameters": dict(model.hparams), "rng_states": torch.stack(states)})
torch.save(torch.rand(3), "resumed.pt")
"""


def test_the_second_rank_of_a_ddp_run_resumes_its_own_random_state(tmp_path):
    # in a process of its own: restoring a row of the gathered states as it is crashed the process (a segfault in
    # torch.set_rng_state), so every DDP resume, and the test of the best checkpoint after a DDP fit, died on rank 1
    (tmp_path / "resume_rank.py").write_text(RESUME_RANK_SCRIPT)
    result = subprocess.run(
        [sys.executable, "resume_rank.py"], cwd=tmp_path, env=tree_under_test_env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    torch.manual_seed(1)
    assert torch.equal(torch.load(tmp_path / "resumed.pt"), torch.rand(3))  # rank 1's stream, not rank 0's
