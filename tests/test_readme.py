"""README's promises: the custom-network script runs outside the repo, and every recipe it names exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dgm_lightning.cli import main
from tests.helpers import write_idx_files

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_the_own_networks_script_trains_a_vae_in_a_plain_trainer(tmp_path):
    script = re.search(r"<!-- readme-script -->\n```python\n(.*?)```", README, re.S).group(1)
    assert len(script.strip().splitlines()) <= 25
    (tmp_path / "my_script.py").write_text(script)
    result = subprocess.run([sys.executable, "my_script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([8, 1, 16, 16])" in result.stdout


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_recipe_trains_for_a_step(config, tmp_path):
    args = ["fit", "--config", str(REPO / "configs" / config), "--trainer.fast_dev_run", "true"]
    args += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    if "data_dir:" in (REPO / "configs" / config).read_text():
        write_idx_files(tmp_path / "data")  # tiny stand-ins for the dataset's original files
        args += ["--data.data_dir", str(tmp_path / "data"), "--data.batch_size", "4"]
    assert main(args).trainer.state.finished


def test_recipes_named_in_the_readme_exist():
    named = set(re.findall(r"configs/([\w.]+\.yaml)", README))
    assert named and all((REPO / "configs" / name).exists() for name in named)


def test_another_optimizer_from_the_command_line():
    cli = main(["fit", "--config", str(REPO / "configs" / "vae_digits.yaml"), "--optimizer", "SGD",
                "--optimizer.lr", "0.01", "--trainer.fast_dev_run", "true", "--trainer.logger", "false"])  # fmt: skip
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer).__name__ == "SGD" and optimizer.param_groups[0]["lr"] == 0.01
