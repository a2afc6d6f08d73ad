"""The command line: LightningCLI with every model, DataModule and callback of the project by class name.

``python train.py`` (no arguments) fits and tests the default recipe; ``fit``/``validate``/``test``/``predict`` are
LightningCLI (``python train.py fit --config vae_digits --model.latent_dim 32``); ``recipes`` lists the shipped
recipes, ``export`` exports a checkpoint's sampler and ``study`` runs and reports strategy studies
(``dgm_lightning.studies``). The installed ``dgm-lightning`` command is the same.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonargparse
import lightning as L
import yaml
from jsonargparse import Namespace, lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from packaging.version import Version

import callbacks  # noqa: F401  (registers the callbacks' class names for --trainer.callbacks)
import datamodules  # noqa: F401  (registers the DataModules' class names for --data)
import dgm_lightning  # noqa: F401  (registers the models' class names for --model)
from callbacks import run_dir
from dgm_lightning.base import comparable_settings
from dgm_lightning.checkpoint_io import AtomicCheckpointIO, check_checkpoint_file
from dgm_lightning.compat import drop_unset_wandb_anonymous
from dgm_lightning.export import main as export_main
from dgm_lightning.precision import default_precision
from dgm_lightning.recipes import describe_recipes, expand_recipe_names
from dgm_lightning.runs import job_settings, new_run_id, resolve_best, resolve_last, write_job

DEFAULT_RECIPE = "vae_digits"  # the default job's recipe (dgm_lightning/configs/vae_digits.yaml)
WANDB_PROJECT = "dgm-lightning"

# Tensors held in memory need no DataLoader worker processes; Lightning's advice to add some is noise here.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Lightning 2.6 calls a torch.utils._pytree API that newer torch deprecates; nothing for a user to act on.
warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")
# The model summary sizes parameters in 32 bits under bf16-mixed, which holds them in 32 bits: it is right, not rough.
warnings.filterwarnings("ignore", ".*is not supported by the model summary.*")


class LightningAdvertFilter(logging.Filter):
    """Drop the Trainer's tips to install Lightning's cloud products (litlogger, litmodels): nothing to act on in a
    run's output. Every other message of Lightning's logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("💡 Tip:") and ("litlogger" in message or "litmodels" in message))


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    if not any(isinstance(f, LightningAdvertFilter) for f in logging.getLogger(_name).filters):
        logging.getLogger(_name).addFilter(LightningAdvertFilter())

# dump/save arguments that keep settings given as null; jsonargparse 4.49 renamed skip_none (which it still takes,
# with a deprecation warning) to skip_unset. By version: its dump's signature is a deprecation wrapper's (**kwargs)
_SKIP = "skip_unset" if Version(jsonargparse.__version__) >= Version("4.49") else "skip_none"
KEEP_NULLS = {_SKIP: False}


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` and the run's job as ``job.yaml`` in the run's own directory, and
    give the config to the loggers.

    Lightning's default writes to ``trainer.log_dir``, which for W&B is the shared root, so the second
    run into the same folder would fail; the run directory is unique per run. Settings given as null are kept
    (as Lightning's own saver does): dropped, their defaults would come back when the file is reused.

    Args:
        job: the run's job settings (see ``dgm_lightning.runs``), or None to write no ``job.yaml``.
    """

    def __init__(
        self,
        parser: LightningArgumentParser,
        config: Namespace,
        config_filename: str = "config.yaml",
        overwrite: bool = False,
        multifile: bool = False,
        save_to_log_dir: bool = True,
        job: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(parser, config, config_filename, overwrite, multifile, save_to_log_dir)
        self.job = job

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, folder / self.config_filename, overwrite=True, multifile=False, **KEEP_NULLS)
        if self.job is not None:
            write_job(folder, self.job)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.config.as_dict()})


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether W&B credentials exist and its server answers, checked without wandb's own login,
    which prompts for a key or waits on the network."""
    import wandb

    url = urlparse(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url)
    if not os.environ.get("WANDB_API_KEY"):
        try:
            if netrc.netrc(os.environ.get("NETRC")).authenticators(url.hostname) is None:
                return False
        except (OSError, netrc.NetrcParseError):
            return False
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


class Trainer(L.Trainer):
    """Lightning's Trainer, its batch limits typed so that the command line reads ``1`` as one batch, not 100 %,
    and its precision ``auto`` by default.

    Lightning annotates them ``Optional[Union[int, float]]``, which Python's typing cache hands back as an equal
    ``Union[float, int, None]`` made earlier by another module; jsonargparse then tries float first, so
    ``--trainer.limit_val_batches 1`` became 1.0: every batch. Here int comes first; everything else is Lightning's.

    Args:
        limit_train_batches: how much of the training set to use each epoch: an int is a number of batches, a
            float a fraction (None: all).
        limit_val_batches: as ``limit_train_batches``, for the validation set.
        limit_test_batches: as ``limit_train_batches``, for the test set.
        limit_predict_batches: as ``limit_train_batches``, for the prediction set.
        precision: Lightning's precision (``32-true``, ``bf16-mixed``, ``16-mixed``...), or ``auto``: the model's
            fastest on this hardware as measured, ``dgm_lightning.precision.default_precision``. The CLI resolves
            ``auto`` once it has the model, and the run's ``config.yaml`` records what it resolved to.
    """

    def __init__(
        self,
        *,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        precision: str | int | None = "auto",  # Lightning checks the value
        **kwargs: Any,  # the rest of Lightning's Trainer arguments, which LightningCLI reads from its signature
    ) -> None:
        if precision == "auto":
            raise ValueError(
                "precision 'auto' depends on the model, which this Trainer is not given: pass "
                "precision=dgm_lightning.precision.default_precision(model) (train.py resolves it itself)"
            )
        super().__init__(
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            precision=precision,
            **kwargs,
        )


class DGMCLI(LightningCLI):
    """LightningCLI whose default logger is W&B, offline when there are no credentials or no network."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=L.LightningModule,
            trainer_class=Trainer,
            subclass_mode_model=True,
            datamodule_class=L.LightningDataModule,
            subclass_mode_data=True,
            trainer_defaults={
                "default_root_dir": "runs",
                # save_dir None: it follows --trainer.default_root_dir (see instantiate_classes)
                "logger": lazy_instance(WandbLogger, project=WANDB_PROJECT, save_dir=None),
            },
            save_config_callback=RunConfigSaver,
            # one way to choose optimizers: the models' own optimizer/lr_scheduler arguments (--model.optimizer)
            auto_configure_optimizers=False,
            save_config_kwargs={"save_to_log_dir": False},
            # a mistyped flag such as --trainer.max_epoch must fail, not be taken as an abbreviation
            parser_kwargs={"allow_abbrev": False},
            args=args,
            run=run,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        else:
            # recipes by name (--config vae_digits), whether the arguments are the command line or given. Parsed
            # here as LightningCLI parses a list, not handed to it, which would warn that both were given
            self.config = parser.parse_args(expand_recipe_names(sys.argv[1:] if args is None else list(args)))
        # the job as configured, before LightningCLI merges a checkpoint's settings into the config
        dump = yaml.safe_load(parser.dump(self.config, skip_validation=True, **KEEP_NULLS))
        subcommand = self.config.get("subcommand")
        self.job = job_settings(dump[subcommand] if subcommand else dump)
        self.save_config_kwargs["job"] = self.job
        self.check_checkpoint_settings()

    def check_checkpoint_settings(self) -> None:
        """Find and check ``--ckpt_path`` before LightningCLI reads its settings (right after ``parse_arguments``).

        LightningCLI replaces the model's settings, class included, with the checkpoint's: a flag such as
        ``--model.latent_dim 4`` would be dropped without a word. Resuming (fit) must configure the checkpoint's
        settings (only those left unset, None, such as a vocabulary taken from the data, may come from it);
        validate, test and predict take the checkpoint's model, and say which settings it changed.
        """
        config = self.config.get(self.config.get("subcommand") or "")
        if config is None or not config.get("ckpt_path") or config.ckpt_path in ("hpc", "registry"):
            return
        if config.ckpt_path in ("last", "best"):
            # only a run of the same job (dgm_lightning.runs), where the checkpoints of this one would lie
            resolve = resolve_last if config.ckpt_path == "last" else resolve_best
            config.ckpt_path = resolve(self.job, output_roots(config.trainer))
            if config.ckpt_path is None:
                return
        saved = read_checkpoint_settings(config.ckpt_path)
        changed = settings_changed(config.model, saved)
        if changed and self.config.subcommand != "fit":
            rank_zero_info(f"--ckpt_path: the model takes the checkpoint's settings ({'; '.join(changed)})")
        elif changed:
            run_config = Path(config.ckpt_path).parent.parent / "config.yaml"
            hint = f" (that run's are in {run_config})" if run_config.is_file() else ""
            raise ValueError(
                f"--ckpt_path {config.ckpt_path} was trained with other model settings than configured here "
                f"({'; '.join(changed)}). To resume it, configure the checkpoint's settings{hint}; to start afresh, "
                "leave out --ckpt_path"
            )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if self.subcommand == "predict":
            # predict logs nothing, but Lightning would still open a logger run (an empty one in W&B)
            config.trainer.logger = False
        logger = config.trainer.logger
        if "WandbLogger" not in str(getattr(logger, "class_path", "")):
            return
        if not logger.init_args.offline and not os.environ.get("WANDB_MODE") and not wandb_reachable():
            logger.init_args.offline = True
            rank_zero_info("W&B: no credentials or no connection, so this run logs offline.")
        if logger.init_args.offline and logger.init_args.log_model:
            raise ValueError(
                "W&B runs offline here (offline=True, or no credentials or no connection), and log_model uploads "
                "checkpoints, which needs a connection: log in (`wandb login`) or drop --trainer.logger.log_model; "
                "or set WANDB_MODE=offline to keep the checkpoints in the offline run until `wandb sync`"
            )

    def instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        # the run's folder, decided for this run only: config.yaml keeps the settings as given, so that reusing
        # it with another --trainer.default_root_dir moves the run there, and a run without a logger gets a new
        # folder again (predict writes to <root>/predictions/ instead)
        given = config.trainer.clone()
        for logger in logger_configs(config.trainer):
            if follows_root(logger):
                logger.init_args.save_dir = config.trainer.default_root_dir
            if logger.class_path.endswith("WandbLogger") and logger.init_args.get("save_dir"):
                # absolute: wandb's service process, started by a process's first run, resolves a relative folder
                # against its own working directory, so a later run after os.chdir would write into the first's
                logger.init_args.save_dir = str(Path(logger.init_args.save_dir).absolute())
        if not logger_configs(config.trainer) and not config.trainer.logger and self.subcommand != "predict":
            root = Path(config.trainer.default_root_dir or ".")
            config.trainer.default_root_dir = str(root / WANDB_PROJECT / new_run_id())
        try:
            super().instantiate_classes()
        finally:
            config.trainer = given
        if config.trainer.precision == "auto":  # the run's config.yaml records what it trained in
            config.trainer.precision = self.trainer.precision
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                drop_unset_wandb_anonymous(logger)
                # wandb looks for a git repository from its folder, and warns when that folder does not exist yet
                Path(logger.save_dir or ".").mkdir(parents=True, exist_ok=True)
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the user configured
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self.config_init.get(self.subcommand) if self.subcommand else self.config_init
        if config.trainer.precision == "auto":
            kwargs.setdefault("precision", default_precision(self.model, config.trainer.accelerator))
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        declare_best_summaries(self.trainer)

    def after_fit(self) -> None:
        announce_offline_wandb(self.trainer)


def settings_changed(configured: Namespace, saved: dict[str, Any]) -> list[str]:
    """'name: checkpoint value, configured value' for each model setting that the checkpoint's settings (its
    ``hyper_parameters``) change: the class, or an init argument configured to something other than None."""
    class_path = saved.get("_class_path")
    if class_path is not None and class_path != configured.class_path:
        return [f"model: {class_path} in the checkpoint, {configured.class_path} configured"]
    ours, theirs = comparable_settings(configured.init_args.as_dict()), comparable_settings(saved)
    return [
        f"{key}: {theirs[key]!r} in the checkpoint, {value!r} configured"
        for key, value in ours.items()
        if value is not None and key in theirs and theirs[key] != value
    ]


def logger_configs(trainer: Namespace) -> list[Namespace]:
    """The configured loggers (``--trainer.logger``: one, a list, or true/false/null)."""
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    return [logger for logger in loggers if isinstance(logger, Namespace) and "init_args" in logger]


def follows_root(logger: Namespace) -> bool:
    """Whether a W&B logger's folder is left to ``--trainer.default_root_dir``: no ``save_dir`` or ``dir`` given
    (``.``, WandbLogger's own default, counts as none, as for ``--trainer.logger WandbLogger``)."""
    settings = logger.init_args
    return (
        logger.class_path.endswith("WandbLogger")
        and settings.get("save_dir") in (None, ".")
        and not settings.get("dir")
    )


def output_roots(trainer: Namespace) -> list[Path]:
    """Where this run's checkpoints will lie, and so where a run of the same job left its own: each logger's
    ``save_dir`` (W&B's follows ``default_root_dir`` unless given) and ``default_root_dir``."""
    loggers = [logger for logger in logger_configs(trainer) if not follows_root(logger)]
    roots = [logger.init_args.get("save_dir") or logger.init_args.get("dir") for logger in loggers]
    roots.append(trainer.default_root_dir)
    return list(dict.fromkeys(Path(root or ".") for root in roots))


def read_checkpoint_settings(path: str) -> dict[str, Any]:
    """The model settings (``hyper_parameters``) of ``--ckpt_path`` given as a file, checked to be a readable
    Lightning checkpoint, so that a bad one fails before any run starts."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"--ckpt_path {path}: no such file; give a .ckpt file (runs/<project>/<run>/checkpoints/last.ckpt), "
            "or 'last' to resume this job's newest run"
        )
    try:
        # weights_only: as LightningCLI reads it next, and a file from elsewhere runs no code
        checkpoint = check_checkpoint_file(path, weights_only=True)
    except ValueError as error:
        raise ValueError(f"--ckpt_path {error}") from None
    if "hyper_parameters" not in checkpoint:
        raise ValueError(
            f"--ckpt_path {path} is not a checkpoint of a dgm-lightning model (it has no hyper_parameters); "
            "give a .ckpt file saved by the Trainer"
        )
    return dict(checkpoint["hyper_parameters"])


def declare_best_summaries(trainer: L.Trainer) -> None:
    """Make W&B's run summary hold the best value of each metric a ModelCheckpoint monitors (its mode: max or
    min), not the last one, so that the runs table compares runs by what their best checkpoint scored."""
    monitored = {c.monitor: c.mode for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and monitored:
            for monitor, mode in monitored.items():
                # the step axis as WandbLogger sets it for every metric ("*"), which a definition by name replaces
                logger.experiment.define_metric(
                    monitor, summary=mode, step_metric="trainer/global_step", step_sync=True
                )


def announce_offline_wandb(trainer: L.Trainer) -> None:
    """Tell the user where an offline W&B run lies and how to upload it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger.experiment.offline:
            folder = Path(logger.experiment.dir).parent
            rank_zero_info(f"W&B run saved offline in {folder}; upload it with: wandb sync {folder}")


def main(args: list[str] | None = None) -> DGMCLI | None:
    """Run one job on ``args`` (default: the command line); ``train.py`` and the ``dgm-lightning`` command call it.

    - no arguments, or only options (``--trainer.max_epochs 5``): the default job, fit then test the default
      recipe with those options on top;
    - ``fit``, ``validate``, ``test``, ``predict``: LightningCLI; ``--config NAME`` names a shipped recipe;
    - ``recipes``: list the shipped recipes; ``export CHECKPOINT --out FOLDER``: export its sampler;
    - ``study run|report|list|sweep``: strategy studies (``dgm_lightning.studies``, needs ``.[study]``).

    The job's W&B run is finished at the end: Lightning's WandbLogger would otherwise log a next job in the same
    process (a notebook, a sweep, DDP tests) into this run.
    """
    command_line = sys.argv[1:] if args is None else list(args)
    if command_line[:1] == ["recipes"]:
        print(describe_recipes())
        return None
    if command_line[:1] == ["export"]:
        export_main(command_line[1:])
        return None
    if command_line[:1] == ["study"]:
        from dgm_lightning.studies.command import main as study_main  # here: Optuna is an optional dependency

        study_main(command_line[1:])
        return None
    subcommand = bool(command_line) and not command_line[0].startswith("-")
    default_job = not subcommand and not {"-h", "--help"} & set(command_line)
    if default_job:
        command_line = ["--config", DEFAULT_RECIPE, *command_line]
    cli = DGMCLI(args=command_line, run=not default_job)
    if default_job:
        declare_best_summaries(cli.trainer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
        announce_offline_wandb(cli.trainer)
    if any(isinstance(logger, WandbLogger) for logger in cli.trainer.loggers):
        import wandb

        wandb.finish()
    return cli


def console() -> None:
    """The ``dgm-lightning`` command: ``main`` on the command line (its exit status is 0 unless it raises)."""
    main()
