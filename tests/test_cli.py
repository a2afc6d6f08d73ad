"""train.py: the default job as a newcomer runs it, LightningCLI subcommands, loggers, predict, bad flags."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datamodules import DigitsDataModule
from dgm_lightning import VAE
from dgm_lightning.cli import DEFAULT_RECIPE, main
from tests.helpers import read_image, wandb_history_keys, wandb_records

REPO = Path(__file__).resolve().parent.parent
QUIET = ["--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def default_job(tmp_path_factory):
    """`python train.py` exactly as README says, on a machine with no W&B credentials and no network."""
    workdir = tmp_path_factory.mktemp("default_job")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(workdir), NETRC=str(workdir / "no-netrc"))
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py")], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (workdir / "runs" / "dgm-lightning").iterdir()
    return workdir, run, result.stdout + result.stderr


def test_default_job_leaves_checkpoint_images_and_config(default_job):
    _, run, _ = default_job
    checkpoints = {p.name for p in (run / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2  # the best one too
    for kind in ("samples", "reconstructions", "interpolations", "traversals"):
        pngs = sorted((run / "images" / kind).glob("epoch_*.png"))
        assert [p.name for p in pngs] == [f"epoch_{e:04d}.png" for e in range(9, 60, 10)]
        grid = read_image(pngs[-1])
        assert grid.dtype == torch.uint8 and grid.shape[0] == 1 and grid.float().std() > 10
    assert "class_path: dgm_lightning.VAE" in (run / "config.yaml").read_text()


def test_default_job_trains_a_vae_clearly_better_than_at_initialisation(default_job):
    _, run, _ = default_job
    data = DigitsDataModule()
    data.setup()
    x, _ = data.splits["test"].tensors

    def test_elbo(model: VAE) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return model.eval().objective(x).terms["elbo"].item()

    trained = test_elbo(VAE.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True))
    untrained = test_elbo(VAE(latent_dim=8, data_shape=(1, 8, 8), hidden_dims=[256, 128]))
    # seen: -44.6 nats per image at initialisation, -24.5 after the default job
    assert trained > untrained + 15, (untrained, trained)


def test_default_job_logs_offline_to_wandb_and_says_how_to_sync(default_job):
    workdir, _, output = default_job
    assert "logs offline" in output and "wandb sync" in output
    (wandb_run,) = (workdir / "runs" / "wandb").glob("offline-run-*")
    keys = wandb_history_keys(wandb_run)
    expected = {"train/loss_step", "train/beta", "val/elbo", "val/kl", "val/reconstruction", "val/active_units"}
    expected |= {"test/elbo", "test/kl", "test/nll", "val/samples/filenames", "val/reconstructions/filenames"}
    assert expected <= keys, expected - keys
    assert len(list((wandb_run / "files" / "media" / "images" / "val").glob("samples_*.png"))) == 6
    config_keys = {
        item.key or "/".join(item.nested_key)
        for record in wandb_records(wandb_run) if record.WhichOneof("record_type") == "config"
        for item in record.config.update
    }  # fmt: skip
    assert {"config", "latent_dim", "likelihood", "batch_size"} <= config_keys


def test_default_job_wandb_summary_holds_the_best_val_elbo(default_job):
    """The checkpoint keeps the best val/elbo; so does the run summary that W&B's runs table shows."""
    workdir, _, _ = default_job
    (wandb_run,) = (workdir / "runs" / "wandb").glob("offline-run-*")
    records = wandb_records(wandb_run)

    history = [item for r in records if r.WhichOneof("record_type") == "history" for item in r.history.item]
    summary = [item for r in records if r.WhichOneof("record_type") == "summary" for item in r.summary.update]

    def elbo(items) -> list:
        return [json.loads(i.value_json) for i in items if (i.key or "/".join(i.nested_key)) == "val/elbo"]

    assert len(elbo(history)) == 60 and elbo(summary)[-1] == {"max": max(elbo(history))}


def test_predict_from_the_checkpoint_writes_samples(default_job):
    _, run, _ = default_job
    main(["predict", "--config", DEFAULT_RECIPE, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), *QUIET])
    (folder,) = Path("runs/predictions").iterdir()
    samples, inputs = torch.load(folder / "samples.pt"), torch.load(folder / "inputs.pt")
    assert samples.shape == inputs.shape == (359, 1, 8, 8)
    assert 0 <= samples.min() and samples.max() <= 1 and not torch.equal(samples[0], samples[1])
    assert (folder / "samples.png").stat().st_size > 0 and (folder / "reconstructions.png").exists()


def test_model_and_data_by_class_name_with_another_logger_and_two_runs_in_one_folder():
    args = ["fit", "--model", "AE", "--data", "DigitsDataModule", "--model.data_shape", "[1,8,8]", *QUIET]
    args += ["--trainer.max_epochs", "1", "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "runs"]
    main(args)
    main(args)
    runs = sorted(p.name for p in Path("runs").glob("version_*"))
    assert runs == ["version_0", "version_1"]
    for run in runs:
        assert "class_path: dgm_lightning.AE" in Path("runs", run, "config.yaml").read_text()
        with open(Path("runs", run, "metrics.csv")) as f:
            assert "val/reconstruction" in next(csv.reader(f))


def test_wandb_name_and_tags_come_from_flags():
    cli = main(["fit", "--config", DEFAULT_RECIPE, "--trainer.max_epochs", "1", "--trainer.logger.name", "my-run",
                "--trainer.logger.tags", "[vae, test]", *QUIET])  # fmt: skip
    cli.trainer.logger.experiment.finish()
    (wandb_run,) = Path("runs/wandb").glob("offline-run-*")
    # wandb's own process writes the file; on a busy machine its run record has come after finish() returned
    # (seen twice in full runs with benchmarks beside them), so wait for it, for a bounded time
    deadline = time.monotonic() + 60
    while not (runs := [r.run for r in _records(wandb_run) if r.WhichOneof("record_type") == "run"]):
        assert time.monotonic() < deadline, f"no run record in {wandb_run} after 60 s"
        time.sleep(0.5)
    (run,) = runs
    assert run.display_name == "my-run" and list(run.tags) == ["vae", "test"] and run.project == "dgm-lightning"


def test_a_second_run_in_the_same_process_after_a_chdir_logs_into_its_own_folder(tmp_path, monkeypatch):
    """wandb's service process keeps the working directory of the process's first run and resolved the default
    relative folder (runs/) against it: the second run's W&B files went into the first run's folder."""
    flags = ["fit", "--config", DEFAULT_RECIPE, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
             "--trainer.limit_val_batches", "1", *QUIET]  # fmt: skip
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        main(flags).trainer.logger.experiment.finish()
        assert len(list(Path("runs/wandb").glob("offline-run-*/run-*.wandb"))) == 1, folder


def _records(wandb_run: Path) -> list:
    """The records written so far: none while wandb has not created the file yet, or while the record it is writing
    cannot be parsed yet (its bytes are there in part)."""
    from google.protobuf.message import DecodeError

    try:
        return wandb_records(wandb_run) if any(wandb_run.glob("run-*.wandb")) else []
    except DecodeError:
        return []


def test_print_config_shows_the_resolved_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEFAULT_RECIPE, "--model.latent_dim", "32", "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: dgm_lightning.VAE" in out and "latent_dim: 32" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model.latnt_dim", "3"], "latnt_dim"),
        (["--model.latent_dim", "three"], "latent_dim"),
        (["--trainer.max_epoch", "3"], "max_epoch"),
        (["--model.likelihood", "poisson"], "likelihood"),
    ],
)
def test_unknown_or_mistyped_flags_exit_with_jsonargparse_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEFAULT_RECIPE, *flags])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model.latent_dim", "0"], "latent_dim must be a positive integer"),
        (["--model.beta", "-1"], "beta must be >= 0"),
        (["--model.data_shape", "[1,28,28]"], r"built for examples of shape \(1, 28, 28\)"),
    ],
)
def test_bad_values_fail_with_a_clear_message(flags, message):
    with pytest.raises(ValueError, match=message):
        main(["fit", "--config", DEFAULT_RECIPE, "--trainer.logger", "false", *flags])


def test_wandb_log_model_offline_is_refused_before_anything_is_written(monkeypatch):
    """Checkpoints cannot be uploaded offline: explicitly offline, or offline for want of credentials."""
    flags = ["fit", "--config", DEFAULT_RECIPE, "--trainer.logger.log_model", "true"]
    with pytest.raises(ValueError, match="log_model uploads checkpoints, which needs a connection"):
        main([*flags, "--trainer.logger.offline", "true"])
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr("dgm_lightning.cli.wandb_reachable", lambda: False)
    with pytest.raises(ValueError, match="or set WANDB_MODE=offline"):
        main(flags)
    assert not Path("runs").exists()


def test_a_batch_limit_of_1_is_one_batch_and_a_fraction_stays_a_fraction(tmp_path):
    """LightningCLI reads --trainer.limit_val_batches 1 as 1.0 (every batch) through Lightning's float-first type;
    a user means one batch, as Trainer(limit_val_batches=1) does in Python."""
    from dgm_lightning.cli import DGMCLI

    cli = DGMCLI(
        args=["--config", DEFAULT_RECIPE, "--trainer.limit_val_batches", "1", "--trainer.limit_train_batches", "0.5",
              "--trainer.limit_test_batches", "2", "--trainer.logger", "false", "--trainer.default_root_dir",
              str(tmp_path)],
        run=False,
    )  # fmt: skip
    trainer = cli.trainer
    assert trainer.limit_val_batches == 1 and isinstance(trainer.limit_val_batches, int)
    assert trainer.limit_test_batches == 2 and isinstance(trainer.limit_test_batches, int)
    assert trainer.limit_train_batches == 0.5
    trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    assert trainer.num_val_batches == [1]


def test_another_optimizer_class_keeps_the_recipes_arguments_unless_reset_first():
    """README: naming a class on top of a recipe's optimizer keeps the arguments the recipe gave; null resets."""
    from dgm_lightning.cli import DGMCLI

    def optimizer_g(*flags: str):
        cli = DGMCLI(args=["--config", "dcgan_digits", *flags, "--trainer.logger", "false"], run=False)
        spec = cli.config.model.init_args.optimizer_g
        return spec.class_path, spec.init_args.lr, tuple(spec.init_args.betas), spec.init_args.weight_decay

    assert optimizer_g() == ("dgm_lightning.optimizers.FusedAdam", 2e-4, (0.5, 0.999), 0.0)
    assert optimizer_g("--model.optimizer_g", "AdamW") == ("torch.optim.AdamW", 2e-4, (0.5, 0.999), 0.01)
    reset = ["--model.optimizer_g", "null", "--model.optimizer_g", "AdamW"]
    assert optimizer_g(*reset) == ("torch.optim.AdamW", 1e-3, (0.9, 0.999), 0.01)


@pytest.mark.parametrize("model", ["AE", "VAE", "FlowVAE"])
def test_the_shared_settings_declared_once_are_documented_and_checked_in_every_latent_variable_model(model, capsys):
    """AE, VAE and FlowVAE take LatentVariableModel's settings by name (**settings): the command line still lists
    and documents each, and a misspelt one fails, on the command line and in Python."""
    import dgm_lightning
    from dgm_lightning.cli import DGMCLI

    with pytest.raises(SystemExit):
        DGMCLI(args=["fit", "--model.help", model], run=False)
    help_text = " ".join(capsys.readouterr().out.split())
    for flag, doc in [
        ("--model.hidden_dims", "hidden sizes (mlp) or channels (conv) of the default encoder"),
        ("--model.likelihood", "``gaussian_learned`` (one learned scale"),
        ("--model.optimizer", "builds the optimizer from the parameters"),
        ("--model.lr_scheduler", "builds a learning-rate scheduler from the optimizer"),
    ]:
        assert flag in help_text and doc in help_text, flag
    with pytest.raises(SystemExit):
        DGMCLI(args=["fit", "--model", model, "--model.hiden_dims", "[8]"], run=False)
    assert "hiden_dims" in capsys.readouterr().err
    with pytest.raises(TypeError, match="unexpected keyword argument 'hiden_dims'"):
        getattr(dgm_lightning, model)(hiden_dims=[8])
