"""The command line: LightningCLI with every model, DataModule and callback of the project by class name.

``python train.py`` (no arguments) fits and tests the default recipe; anything else is LightningCLI:
``python train.py fit --config configs/vae_digits.yaml --model.latent_dim 32``.
"""

from __future__ import annotations

import netrc
import os
import socket
import sys
import warnings
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

import callbacks  # noqa: F401  (registers the callbacks' class names for --trainer.callbacks)
import datamodules  # noqa: F401  (registers the DataModules' class names for --data)
import dgm_lightning  # noqa: F401  (registers the models' class names for --model)
from callbacks import run_dir

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "vae_digits.yaml"
WANDB_PROJECT = "dgm-lightning"

# Tensors held in memory need no DataLoader worker processes; Lightning's advice to add some is noise here.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Lightning 2.6 calls a torch.utils._pytree API that newer torch deprecates; nothing for a user to act on.
warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the run's own directory and give it to the loggers.

    Lightning's default writes to ``trainer.log_dir``, which for W&B is the shared root, so the second
    run into the same folder would fail; the run directory is unique per run.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, folder / self.config_filename, overwrite=True, multifile=False)
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


class DGMCLI(LightningCLI):
    """LightningCLI whose default logger is W&B, offline when there are no credentials or no network."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=L.LightningModule,
            subclass_mode_model=True,
            datamodule_class=L.LightningDataModule,
            subclass_mode_data=True,
            trainer_defaults={
                "default_root_dir": "runs",
                "logger": lazy_instance(WandbLogger, project=WANDB_PROJECT, save_dir="runs"),
            },
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"save_to_log_dir": False},
            # a mistyped flag such as --trainer.max_epoch must fail, not be taken as an abbreviation
            parser_kwargs={"allow_abbrev": False},
            args=args,
            run=run,
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model's settings, class included, with the checkpoint's: a flag such as
        # --model.latent_dim 4 would be dropped without a word. Here the checkpoint is found and checked first.
        # Resuming (fit) must configure the checkpoint's settings (only those left unset, None, such as a
        # vocabulary taken from the data, may come from it); validate, test and predict take the checkpoint's model.
        config = self.config.get(self.config.get("subcommand") or "")
        if config is None or not config.get("ckpt_path"):
            return
        logger = config.trainer.logger
        root = getattr(getattr(logger, "init_args", None), "save_dir", None) or config.trainer.default_root_dir
        config.ckpt_path = resolve_checkpoint(config.ckpt_path, Path(root or "."))  # checkpoints lie under root
        configured = config.model.clone()
        super()._parse_ckpt_path()
        changed = settings_changed(configured, self.config[self.config.subcommand].model)
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
        super().instantiate_classes()
        # LightningCLI would silently replace the optimizers of a model that steps its own (manual optimization,
        # e.g. a GAN's two): refuse, and point at the model's own flags
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        given = [f"--{key}" for key in ("optimizer", "lr_scheduler") if config.get(key) is not None]
        if given == ["--lr_scheduler"] and self.model.automatic_optimization:
            # LightningCLI would silently ignore it: it replaces configure_optimizers only when given an optimizer
            raise ValueError(
                "--lr_scheduler needs --optimizer too, or it is ignored: add e.g. --optimizer Adam --optimizer.lr 1e-3"
            )
        if given and not self.model.automatic_optimization:
            name = type(self.model).__name__
            flags = getattr(self.model, "optimizer_flags", f"see `python train.py fit --model {name} --help`")
            raise ValueError(
                f"{name} steps its own optimizers (manual optimization), so {' and '.join(given)} cannot set them; "
                f"use its optimizer flags instead: {flags}"
            )

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        # LightningCLI builds --optimizer on the model's parameters at once, but a model that sizes its networks
        # from the data in setup (RecurrentVAE) has none yet: let Lightning's own code run when the Trainer asks
        # for the optimizers, which is after setup
        model, add = self.model, super()._add_configure_optimizers_method_to_model
        if next(model.parameters(), None) is not None:
            return add(subcommand)
        own = model.configure_optimizers

        def configure_optimizers():
            model.configure_optimizers = own
            add(subcommand)  # replaces model.configure_optimizers if --optimizer was given
            return model.configure_optimizers()

        model.configure_optimizers = configure_optimizers

    def after_fit(self) -> None:
        announce_offline_wandb(self.trainer)


def settings_changed(configured, loaded) -> list[str]:
    """'name: checkpoint value, configured value' for each model setting that the checkpoint changed (the class,
    or an init argument configured to something other than None)."""
    if configured.class_path != loaded.class_path:
        return [f"model: {loaded.class_path} in the checkpoint, {configured.class_path} configured"]
    # LightningCLI puts the checkpoint's settings in dict_kwargs, which take precedence over init_args
    ours, theirs = configured.init_args.as_dict(), {**loaded.init_args.as_dict(), **loaded.get("dict_kwargs", {})}
    return [
        f"{key}: {theirs.get(key)!r} in the checkpoint, {value!r} configured"
        for key, value in ours.items()
        if value is not None and theirs.get(key) != value
    ]


def resolve_checkpoint(path: str, root: Path) -> str:
    """``--ckpt_path``: ``last`` becomes the newest ``last.ckpt`` under the run root (each run, W&B or not, keeps
    its checkpoints in a folder of its own, where Lightning's own ``last`` would look only in the new run's);
    a file is checked to be a readable Lightning checkpoint, so that a bad one fails before any run starts."""
    if path == "last":
        found = sorted(root.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
        if found:
            rank_zero_info(f"--ckpt_path last: resuming from {found[-1]}")
            return str(found[-1])
        return path  # Lightning warns that there is none and starts afresh: what a re-queued job wants
    if path in ("best", "hpc", "registry"):
        return path
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"--ckpt_path {path}: no such file; give a .ckpt file (runs/<project>/<run>/checkpoints/last.ckpt), "
            f"or 'last' for the newest last.ckpt under {root}"
        )
    try:
        # mmap: reading the index, not the weights, tells a whole checkpoint from a cut one; weights_only: as
        # LightningCLI reads it next, and a file from elsewhere runs no code
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:
        raise ValueError(
            f"--ckpt_path {path} is not a readable checkpoint ({error}); it may be truncated (a run killed while "
            "saving it) or not a PyTorch file; use another one, such as the run's last.ckpt"
        ) from error
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= checkpoint.keys():
        raise ValueError(
            f"--ckpt_path {path} is not a checkpoint of a dgm-lightning model (no state_dict and hyper_parameters); "
            "give a .ckpt file saved by the Trainer"
        )
    return path


def announce_offline_wandb(trainer: L.Trainer) -> None:
    """Tell the user where an offline W&B run lies and how to upload it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger.experiment.offline:
            folder = Path(logger.experiment.dir).parent
            rank_zero_info(f"W&B run saved offline in {folder}; upload it with: wandb sync {folder}")


def main(args: list[str] | None = None) -> DGMCLI:
    """Run one job on ``args`` (default: the command line). No arguments: fit, then test, the default recipe.

    The job's W&B run is finished at the end: Lightning's WandbLogger would otherwise log a next job in the same
    process (a notebook, a sweep, DDP tests) into this run.
    """
    args = sys.argv[1:] if args is None else args
    if args:
        cli = DGMCLI(args=args)
    else:
        cli = DGMCLI(args=["--config", str(DEFAULT_CONFIG)], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
        announce_offline_wandb(cli.trainer)
    if any(isinstance(logger, WandbLogger) for logger in cli.trainer.loggers):
        import wandb

        wandb.finish()
    return cli
