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

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if self.subcommand == "predict":
            # predict logs nothing, but Lightning would still open a logger run (an empty one in W&B)
            config.trainer.logger = False
        logger = config.trainer.logger
        uses_wandb = "WandbLogger" in str(getattr(logger, "class_path", ""))
        if uses_wandb and not logger.init_args.offline and not os.environ.get("WANDB_MODE") and not wandb_reachable():
            logger.init_args.offline = True
            rank_zero_info("W&B: no credentials or no connection, so this run logs offline.")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # LightningCLI would silently replace the optimizers of a model that steps its own (manual optimization,
        # e.g. a GAN's two): refuse, and point at the model's own flags
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        given = [f"--{key}" for key in ("optimizer", "lr_scheduler") if config.get(key) is not None]
        if given and not self.model.automatic_optimization:
            name = type(self.model).__name__
            flags = getattr(self.model, "optimizer_flags", f"see `python train.py fit --model {name} --help`")
            raise ValueError(
                f"{name} steps its own optimizers (manual optimization), so {' and '.join(given)} cannot set them; "
                f"use its optimizer flags instead: {flags}"
            )

    def after_fit(self) -> None:
        announce_offline_wandb(self.trainer)


def announce_offline_wandb(trainer: L.Trainer) -> None:
    """Tell the user where an offline W&B run lies and how to upload it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger.experiment.offline:
            folder = Path(logger.experiment.dir).parent
            rank_zero_info(f"W&B run saved offline in {folder}; upload it with: wandb sync {folder}")


def main(args: list[str] | None = None) -> DGMCLI:
    """Run the CLI on ``args`` (default: the command line). No arguments: fit, then test, the default recipe."""
    args = sys.argv[1:] if args is None else args
    if args:
        return DGMCLI(args=args)
    cli = DGMCLI(args=["--config", str(DEFAULT_CONFIG)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
    announce_offline_wandb(cli.trainer)
    return cli
