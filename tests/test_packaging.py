"""Beyond the repository: recipes by name, the installed command, one version, and a wheel that works on its own."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib
import torch

import dgm_lightning
from dgm_lightning.cli import main
from dgm_lightning.recipes import RECIPES_DIR, describe_recipes, expand_recipe_names, recipe_names, recipe_path

REPO = Path(__file__).resolve().parent.parent


def test_every_recipe_ships_inside_the_package_and_the_clone_links_to_them():
    names = recipe_names()
    assert len(names) == len(list((REPO / "configs").glob("*.yaml"))) > 20
    assert RECIPES_DIR.parent == Path(dgm_lightning.__file__).resolve().parent
    assert (REPO / "configs").resolve() == RECIPES_DIR
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "configs/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["dgm_lightning"]


def test_a_recipe_is_named_without_a_path_and_a_path_still_works(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("trainer:\n  max_epochs: 1\n")
    assert expand_recipe_names(["fit", "--config", "vae_digits"]) == ["fit", "--config", str(recipe_path("vae_digits"))]
    assert expand_recipe_names(["fit", "--config=glow_digits.yaml"]) == [
        "fit", f"--config={recipe_path('glow_digits')}"
    ]  # fmt: skip
    assert expand_recipe_names(["fit", "--config", str(own)]) == ["fit", "--config", str(own)]
    # a value of another flag that happens to be a recipe's name is left alone
    assert expand_recipe_names(["fit", "--trainer.logger.name", "vae_digits"])[-1] == "vae_digits"
    with pytest.raises(FileNotFoundError, match=r"no recipe of that name; recipes: ae_digits, .*vae_digits"):
        expand_recipe_names(["fit", "--config", "vae_digitz"])


def test_recipes_lists_every_recipe_with_its_summary(capsys):
    main(["recipes"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == recipe_names()
    assert "the default job of `python train.py`" in describe_recipes()


def test_the_version_is_written_once_and_the_metadata_reads_it():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dgm_lightning.__version__"}
    assert importlib.metadata.version("dgm-lightning") == dgm_lightning.__version__
    assert pyproject["project"]["scripts"]["dgm-lightning"] == "dgm_lightning.cli:console"
    assert f"## [{dgm_lightning.__version__}]" in (REPO / "CHANGELOG.md").read_text()
    assert pyproject["project"]["classifiers"]


def test_options_without_a_subcommand_run_the_default_job_with_them(tmp_path):
    cli = main([
        "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
    ])  # fmt: skip
    assert cli.trainer.current_epoch == 1  # one epoch, not the recipe's 60
    assert "test/elbo" in cli.trainer.callback_metrics  # and then the test, as the default job does


def _site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_environment_runs_the_command_from_an_empty_folder(tmp_path):
    """Build the wheel, install it alone into a new virtual environment, and from an empty folder run the installed
    command: the default job (small budget), a named recipe, then predict from the checkpoint it wrote.

    The dependencies (torch, lightning, ...) are this environment's, seen through a path entry (not its .pth files,
    so not its editable install of this repository); dgm-lightning itself comes only from the wheel.
    """
    dist, venv, empty = tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    empty.mkdir()
    # pip's build isolation would fetch setuptools from the package index; this environment's is recent enough
    no_isolation = ["--no-build-isolation"] if _setuptools_recent() else []
    # from a copy: setuptools writes build/ and *.egg-info/ beside the sources, and tests write only under tmp_path
    source = tmp_path / "source"
    junk = shutil.ignore_patterns(".git", "build", "*.egg-info", "runs", "wandb", "__pycache__", ".venv")
    shutil.copytree(REPO, source, symlinks=True, ignore=junk)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *no_isolation, "-w", str(dist), str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = dist.glob("dgm_lightning-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = _site_packages(venv)
    # a bare path line: Python adds the directory but runs none of its .pth files (the editable finder)
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"WANDB_MODE": "offline"}

    def run(*args: str) -> None:
        result = subprocess.run(
            [str(venv / "bin" / "dgm-lightning"), *args, "--trainer.enable_progress_bar", "false"], cwd=empty,
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    where = subprocess.run(
        [str(python), "-c", "import dgm_lightning; print(dgm_lightning.__file__)"], cwd=empty, env=env,
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not the repository's
    run("--trainer.max_epochs", "2")  # the default job, fit and test
    run("fit", "--config", "ae_digits", "--trainer.max_epochs", "1", "--trainer.logger", "false")
    classes = {path: torch.load(path, weights_only=True)["hyper_parameters"]["_class_path"]
               for path in empty.rglob("last.ckpt")}  # fmt: skip
    assert sorted(classes.values()) == ["dgm_lightning.AE", "dgm_lightning.VAE"]
    (checkpoint,) = (path for path, name in classes.items() if name == "dgm_lightning.AE")
    run("predict", "--config", "ae_digits", "--ckpt_path", str(checkpoint))
    (samples,) = empty.rglob("predictions/*/samples.pt")
    assert torch.load(samples).shape[1:] == (1, 8, 8)


def _setuptools_recent() -> bool:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0]) >= 77
    except importlib.metadata.PackageNotFoundError:
        return False
