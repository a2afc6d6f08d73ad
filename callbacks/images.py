"""Image grids of samples, reconstructions and latent interpolations: PNGs in the run directory and the logger."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import make_grid


def run_dir(trainer: L.Trainer) -> Path:
    """The directory of this run: where ModelCheckpoint puts its ``checkpoints/`` folder.

    Written out because Lightning's ``trainer.log_dir`` is the shared root for loggers such as W&B,
    where two runs would write over each other; this mirrors ModelCheckpoint's own rule.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


def to_uint8_grid(images: Tensor, value_range: tuple[float, float], nrow: int, min_cell: int = 32) -> Tensor:
    """Images (B, C, H, W) in value_range -> one uint8 grid (3 or 1, H', W'), small images enlarged."""
    low, high = value_range
    images = ((images.detach().float().cpu() - low) / (high - low)).clamp(0, 1)
    scale = max(1, min_cell // min(images.shape[-2:]))
    if scale > 1:  # nearest keeps pixels sharp, so 8x8 digits stay readable
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    if images.shape[1] == 1:
        grid = grid[:1]
    return (grid * 255).round().to(torch.uint8)


def save_and_log_grid(trainer: L.Trainer, key: str, grid: Tensor, path: Path) -> None:
    """Write the grid as a PNG, then hand the file to every logger that takes images (W&B's log_image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(grid, str(path))
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)


class ImageLogger(Callback):
    """After validation epochs, draw samples, reconstructions and latent interpolations as image grids.

    Uses only the model protocol: ``sample(n)``, and ``encode``/``decode`` where the model has them.
    PNGs go to ``<run dir>/images/<kind>/epoch_XXXX.png``; loggers with ``log_image`` (W&B) receive
    them under ``val/<kind>``. Draws with a fixed seed (the same noise every epoch, so progress is
    visible) without disturbing the training's random state. Runs on rank zero only.

    Args:
        every_n_epochs: draw after every n-th validation epoch.
        num_samples: samples in the sample grid.
        num_reconstructions: validation images shown above their reconstructions.
        num_interpolations: pairs of validation images to interpolate between.
        interpolation_steps: images per interpolation row, endpoints included.
        temperature: latent temperature for samples.
        seed: seed of the sampling noise.
    """

    def __init__(
        self,
        *,
        every_n_epochs: int = 1,
        num_samples: int = 64,
        num_reconstructions: int = 16,
        num_interpolations: int = 4,
        interpolation_steps: int = 10,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        for name, value in dict(
            every_n_epochs=every_n_epochs, num_samples=num_samples, interpolation_steps=interpolation_steps
        ).items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.num_reconstructions = num_reconstructions
        self.num_interpolations = num_interpolations
        self.interpolation_steps = interpolation_steps
        self.temperature = temperature
        self.seed = seed
        self._inputs: tuple[Tensor, Tensor | None] | None = None

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        # keep the first validation images as fixed inputs for reconstructions and interpolations
        if self._inputs is None and batch_idx == 0 and dataloader_idx == 0 and hasattr(pl_module, "unpack_batch"):
            x, y = pl_module.unpack_batch(batch)
            n = max(self.num_reconstructions, 2 * self.num_interpolations)
            self._inputs = (x[:n].detach(), None if y is None else y[:n].detach())

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []),
        ):
            torch.manual_seed(self.seed)
            grids = self.grids(pl_module)
        folder = run_dir(trainer) / "images"
        for kind, grid in grids.items():
            save_and_log_grid(trainer, f"val/{kind}", grid, folder / kind / f"epoch_{trainer.current_epoch:04d}.png")

    def grids(self, model: L.LightningModule) -> dict[str, Tensor]:
        """The image grids to draw, by kind, as uint8 tensors."""
        value_range = getattr(model, "value_range", (0.0, 1.0))
        samples = model.sample(self.num_samples, temperature=self.temperature)
        grids = {"samples": to_uint8_grid(samples, value_range, nrow=int(self.num_samples**0.5))}
        if self._inputs is None or not hasattr(model, "encode"):
            return grids
        x, y = (t if t is None else t.to(model.device) for t in self._inputs)
        if self.num_reconstructions > 0:
            n = min(self.num_reconstructions, x.shape[0])
            recon = model.reconstruct(x[:n], labels=None if y is None else y[:n])
            grids["reconstructions"] = to_uint8_grid(torch.cat([x[:n], recon]), value_range, nrow=n)
        pairs = min(self.num_interpolations, x.shape[0] // 2)
        if pairs > 0:
            grids["interpolations"] = to_uint8_grid(
                self._interpolate(model, x, y, pairs), value_range, self.interpolation_steps
            )
        return grids

    def _interpolate(self, model: L.LightningModule, x: Tensor, y: Tensor | None, pairs: int) -> Tensor:
        """Decode straight lines between the codes of image pairs; each row keeps its first image's label."""
        labels = None if y is None else y[:pairs]
        z0 = model.encode(x[:pairs], labels=labels)
        z1 = model.encode(x[pairs : 2 * pairs], labels=None if y is None else y[pairs : 2 * pairs])
        t = torch.linspace(0, 1, self.interpolation_steps, device=z0.device)[None, :, None]
        z = (z0[:, None] * (1 - t) + z1[:, None] * t).flatten(0, 1)  # (pairs * steps, D), row-major
        row_labels = None if labels is None else labels.repeat_interleave(self.interpolation_steps)
        return model.decode(z, labels=row_labels)


class PredictionWriter(BasePredictionWriter):
    """Write what ``predict`` returns (dicts of tensors per batch) to disk: one ``.pt`` and one PNG grid per key.

    Args:
        output_dir: folder for the files; by default ``<default_root_dir>/predictions/<date-time>``,
            a new folder for every run so that nothing is written over.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        if not trainer.is_global_zero or not predictions:
            return
        folder = Path(self.output_dir or Path(trainer.default_root_dir, "predictions", time.strftime("%Y%m%d-%H%M%S")))
        folder.mkdir(parents=True, exist_ok=True)
        value_range = getattr(pl_module, "value_range", (0.0, 1.0))
        for key in predictions[0]:
            tensor = torch.cat([batch[key].cpu() for batch in predictions])
            torch.save(tensor, folder / f"{key}.pt")
            if tensor.dim() == 4:
                grid = to_uint8_grid(tensor[:64], value_range, nrow=8)
                write_png(grid, str(folder / f"{key}.png"))
        rank_zero_info(f"Predictions written to {folder}")
