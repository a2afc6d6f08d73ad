"""Run folders and jobs: where a run's files go, which run ``--ckpt_path last``/``best`` resumes, saved configs that
reproduce the run, checkpoints written atomically, and what the first screen of a command-line run shows."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from callbacks import PredictionWriter
from dgm_lightning.cli import DGMCLI, main
from dgm_lightning.runs import resolve_best, write_job
from tests.helpers import stand_in_flags, wandb_records

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
TINY = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip
NO_LOGGER = ["--trainer.logger", "false"]


def fit(recipe: str, root: Path, *flags: str) -> DGMCLI:
    return main(["fit", "--config", str(CONFIGS / f"{recipe}.yaml"), *TINY, "--trainer.default_root_dir", str(root),
                 *flags])  # fmt: skip


def last_checkpoint(cli: DGMCLI) -> Path:
    return Path(cli.trainer.checkpoint_callback.last_model_path).resolve()


def resumed_from(cli: DGMCLI) -> Path | None:
    path = cli.config.fit.ckpt_path
    return None if path is None else Path(path).resolve()


# -- the output root decides where everything goes; every run gets its own folder ------------------------------


@pytest.fixture(scope="module")
def command_line_run(tmp_path_factory):
    """`python train.py fit ...` as a user types it, with the default (W&B, offline) logger and an output root."""
    workdir = tmp_path_factory.mktemp("command_line")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # not silenced: the screen as shown
    env.update(WANDB_MODE="offline", PYTHONPATH=str(REPO), HOME=str(workdir), NETRC=str(workdir / "no-netrc"))
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(CONFIGS / "vae_digits.yaml"), *TINY,
               "--trainer.max_epochs", "3", "--trainer.limit_val_batches", "2",
               "--trainer.default_root_dir", "out"]  # fmt: skip
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout + result.stderr


def test_the_output_root_holds_the_checkpoints_config_and_wandb_run(command_line_run):
    workdir, _ = command_line_run
    (run,) = (workdir / "out" / "dgm-lightning").iterdir()
    assert {p.name for p in run.iterdir()} >= {"checkpoints", "config.yaml", "job.yaml"}
    assert (run / "checkpoints" / "last.ckpt").is_file()
    (wandb_run,) = (workdir / "out" / "wandb").glob(f"offline-run-*-{run.name}")  # W&B's files follow the root too
    assert not (workdir / "runs").exists() and not (workdir / "wandb").exists()
    # the default save_dir is not written into config.yaml: reused with another root, the run goes there
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["save_dir"] is None


def test_the_first_screen_holds_nothing_a_newcomer_cannot_act_on(command_line_run):
    _, output = command_line_run
    assert "W&B run saved offline in" in output and "Trainer.fit` stopped" in output  # the whole screen is here
    for noise in ("not recommended to provide both args", "anonymous setting has no effect", "git root", "litlogger",
                  "litmodels"):  # fmt: skip
        assert noise not in output, noise


def test_wandb_summary_holds_the_best_value_of_the_monitored_metric(command_line_run):
    workdir, _ = command_line_run
    (wandb_run,) = workdir.glob("**/wandb/offline-run-*")
    records = wandb_records(wandb_run)
    (metric,) = [r.metric for r in records if r.WhichOneof("record_type") == "metric" and r.metric.name == "val/elbo"]
    assert metric.summary.max and metric.step_metric == "trainer/global_step"  # the recipe's checkpoint: val/elbo max
    history = [
        json.loads(item.value_json)
        for r in records if r.WhichOneof("record_type") == "history"
        for item in r.history.item if (item.key or "/".join(item.nested_key)) == "val/elbo"
    ]  # fmt: skip
    summaries = [
        json.loads(item.value_json)
        for r in records if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update if (item.key or "/".join(item.nested_key)) == "val/elbo"
    ]  # fmt: skip
    assert len(history) == 3 and summaries[-1] == {"max": max(history)}


def test_runs_without_a_logger_each_get_their_own_folder(tmp_path):
    first = fit("vae_digits", tmp_path, *NO_LOGGER)
    second = fit("vae_digits", tmp_path, *NO_LOGGER, "--trainer.max_epochs", "2")
    runs = sorted((tmp_path / "dgm-lightning").iterdir())
    assert len(runs) == 2 and last_checkpoint(first).parent.parent != last_checkpoint(second).parent.parent
    for run, epochs in zip(sorted(runs, key=lambda r: (r / "config.yaml").stat().st_mtime), (1, 2), strict=True):
        assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"] == epochs  # not written over
        assert {p.name for p in (run / "checkpoints").iterdir() if "last" in p.name} == {"last.ckpt"}  # no last-v1
    assert not (tmp_path / "checkpoints").exists()


# -- --ckpt_path last and best: only runs of the same job -----------------------------------------------------


def test_ckpt_path_last_resumes_each_jobs_own_run_in_a_shared_root(tmp_path):
    """Two jobs (other batch sizes) in one root: `last` resumes each one's own run, not the newest last.ckpt."""
    job_a = ["--data.batch_size", "32", *NO_LOGGER]
    job_b = ["--data.batch_size", "16", *NO_LOGGER]
    a = last_checkpoint(fit("vae_digits", tmp_path, *job_a))
    time.sleep(0.05)  # B's last.ckpt is the newer one
    b = last_checkpoint(fit("vae_digits", tmp_path, *job_b))
    resumed_a = fit("vae_digits", tmp_path, *job_a, "--ckpt_path", "last", "--trainer.max_epochs", "2")
    assert resumed_from(resumed_a) == a and resumed_a.trainer.global_step == 4  # 2 batches more
    resumed_b = fit("vae_digits", tmp_path, *job_b, "--ckpt_path", "last", "--trainer.max_epochs", "2")
    assert resumed_from(resumed_b) == b
    # the next `last` of job A continues its newest run: the resumed one
    again = fit("vae_digits", tmp_path, *job_a, "--ckpt_path", "last", "--trainer.max_epochs", "3")
    assert resumed_from(again) == last_checkpoint(resumed_a) and again.trainer.global_step == 6


def test_ckpt_path_last_with_no_run_of_the_job_starts_afresh_and_names_the_other_job(tmp_path, caplog):
    fit("vae_digits", tmp_path, "--data.batch_size", "32", *NO_LOGGER)
    with caplog.at_level("INFO"):
        cli = fit("vae_digits", tmp_path, "--data.batch_size", "16", *NO_LOGGER, "--ckpt_path", "last")
    assert resumed_from(cli) is None and cli.trainer.global_step == 2
    assert "no earlier run of this job" in caplog.text and "data.init_args.batch_size" in caplog.text


def fake_run(root: Path, name: str, job: dict, score: float) -> Path:
    """A run folder as the command line leaves it: job.yaml, a best checkpoint, and last.ckpt recording it."""
    folder = root / name / "checkpoints"
    folder.mkdir(parents=True)
    write_job(folder.parent, job)
    torch.save({"weights": torch.zeros(1)}, folder / f"epoch={name}.ckpt")
    state = {"monitor": "val/elbo", "best_model_score": torch.tensor(score),
             "best_model_path": f"/another/machine/{name}/checkpoints/epoch={name}.ckpt"}  # fmt: skip
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/elbo', 'mode': 'max'}": state}}, folder / "last.ckpt")
    return folder / f"epoch={name}.ckpt"


def test_ckpt_path_best_takes_the_best_of_this_jobs_runs_by_the_monitor_and_mode(tmp_path):
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"monitor": "val/elbo", "mode": "max"}}  # fmt: skip
    job = {"model": {"class_path": "dgm_lightning.VAE"}, "trainer.callbacks": [checkpoint]}
    other_job = {**job, "data": {"class_path": "datamodules.DigitsDataModule"}}
    fake_run(tmp_path, "a", job, -30.0)
    best = fake_run(tmp_path, "b", job, -25.0)  # the highest elbo of this job, recorded by another machine's path
    fake_run(tmp_path, "c", job, -27.0)
    fake_run(tmp_path, "d", other_job, -10.0)  # better, but another job's
    assert Path(resolve_best(job, [tmp_path])) == best.resolve()
    with pytest.raises(ValueError, match="monitors no metric"):
        resolve_best({**job, "trainer.callbacks": []}, [tmp_path])


def test_fit_ckpt_path_best_resumes_the_best_checkpoint_of_the_previous_run_or_says_why_not(tmp_path):
    first = fit("vae_digits", tmp_path, *NO_LOGGER, "--trainer.max_epochs", "2")
    best = Path(first.trainer.checkpoint_callback.best_model_path).resolve()
    resumed = fit("vae_digits", tmp_path, *NO_LOGGER, "--ckpt_path", "best", "--trainer.max_epochs", "3")
    assert resumed_from(resumed) == best and best.parent == last_checkpoint(first).parent
    with pytest.raises(FileNotFoundError, match="no run of this job under .* holds a best checkpoint by val/elbo"):
        fit("vae_digits", tmp_path / "empty", *NO_LOGGER, "--ckpt_path", "best")
    with pytest.raises(ValueError, match="monitors no metric"):  # Lightning's default ModelCheckpoint: none
        fit("vae_digits", tmp_path, *NO_LOGGER, "--trainer.callbacks", "[]", "--ckpt_path", "best")


# -- predict: a folder of its own ------------------------------------------------------------------------------


def test_two_predict_jobs_in_the_same_second_write_into_distinct_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda *args: "20250101-120000")  # the same second for both
    trainer, model = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path)), SimpleNamespace()
    for seed in (0, 1):
        samples = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        PredictionWriter().write_on_epoch_end(trainer, model, [{"samples": samples}], [])
    folders = sorted((tmp_path / "predictions").iterdir())
    assert len(folders) == 2
    first, second = (torch.load(folder / "samples.pt") for folder in folders)
    assert not torch.equal(first, second)


def test_predict_refuses_an_output_dir_that_holds_files_before_predicting(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "samples.pt").write_bytes(b"earlier outputs")
    writer = PredictionWriter(output_dir=str(tmp_path / "out"))
    trainer, model = SimpleNamespace(is_global_zero=True), SimpleNamespace(predict_step=lambda batch, batch_idx: None)
    with pytest.raises(FileExistsError, match="out already holds files .* --trainer.callbacks.output_dir"):
        writer.setup(trainer, model, "predict")
    assert (tmp_path / "out" / "samples.pt").read_bytes() == b"earlier outputs"


# -- config.yaml reproduces the run: every recipe resumes from its own saved config and last checkpoint -------

RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
# a fast representative per family in the default suite, the nulls of point 7 included; the rest with -m slow
FAST = {"realnvp_two_moons", "glow_checkerboard", "vae_digits", "dcgan_digits", "rvae_text", "classifier_digits"}


@pytest.mark.parametrize(
    "recipe", [r if r in FAST else pytest.param(r, marks=pytest.mark.slow) for r in RECIPES]
)  # fmt: skip
def test_every_recipe_resumes_from_its_saved_config_and_last_checkpoint(recipe, tmp_path):
    # tiny stand-ins for the dataset's original files; a VQ-VAE prior's recipe also gets a first-stage checkpoint
    flags = [*NO_LOGGER, *stand_in_flags(CONFIGS / f"{recipe}.yaml", tmp_path)]
    if "data_dir:" in (CONFIGS / f"{recipe}.yaml").read_text():
        flags += ["--data.batch_size", "4"]
    first = fit(recipe, tmp_path / "runs", *flags)
    run = last_checkpoint(first).parent.parent
    saved = yaml.safe_load((run / "config.yaml").read_text())
    recipe_model = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())["model"]["init_args"]
    for key, value in recipe_model.items():  # nulls included: quantization_levels: null must not become 256
        assert saved["model"]["init_args"][key] == value or isinstance(value, dict), key
    resumed = main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    assert resumed_from(resumed) == last_checkpoint(first)  # the saved config is the same job
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step > first.trainer.global_step
    assert resumed.model.hparams == first.model.hparams


def test_a_null_given_on_the_command_line_is_kept_in_the_saved_config(tmp_path):
    first = fit("dcgan_digits", tmp_path, *NO_LOGGER, "--model.ema_decay", "null")
    run = last_checkpoint(first).parent.parent
    reused = main(["fit", "--config", str(run / "config.yaml"), "--trainer.max_steps", "0"])
    assert first.model.hparams.ema_decay is None and reused.model.hparams.ema_decay is None


# -- checkpoints are written atomically ---------------------------------------------------------------------


def test_a_disk_full_while_saving_leaves_no_partial_checkpoint_and_last_intact(tmp_path, monkeypatch):
    """The checkpoint folder's disk fills up halfway through a save, whichever way the bytes reach it: written
    there (torch.save into a file) or moved there from $TMPDIR on another filesystem (a copy, cut short)."""
    cli = fit("vae_digits", tmp_path, *NO_LOGGER)
    folder = last_checkpoint(cli).parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_save, real_move = torch.save, shutil.move

    def full_disk(written) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(written))

    def save_half(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO):  # into memory: no disk involved
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        half = buffer.getvalue()[: buffer.tell() // 2]
        Path(f).write_bytes(half) if isinstance(f, (str, os.PathLike)) else f.write(half)
        full_disk(f)

    def move_half(source, target):
        if Path(target).parent.resolve() != folder.resolve():
            return real_move(source, target)
        data = Path(source).read_bytes()
        Path(target).write_bytes(data[: len(data) // 2])
        full_disk(target)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save_half)
        patch.setattr(shutil, "move", move_half)
        with pytest.raises(OSError, match="No space left on device"):
            cli.trainer.save_checkpoint(folder / "epoch=1-step=4.ckpt")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no cut file, no temporary one left
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2
