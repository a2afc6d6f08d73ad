"""Image grids of samples, reconstructions and latent interpolations: PNGs in the run directory and the logger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid
from typing_extensions import override

from callbacks.density import density_panels, is_2d
from dgm_lightning.checks import check_positive


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


def save_png(grid: Tensor, path: Path) -> None:
    """A uint8 (C, H, W) image as a PNG file (with PIL: torchvision's image encoders are deprecated)."""
    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


def save_and_log_grid(trainer: L.Trainer, key: str, grid: Tensor, path: Path) -> None:
    """Write the grid as a PNG, then hand the file to every logger that takes images (W&B's log_image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path)
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            # no step: W&B then files the image under the trainer step of the scalars logged last. Passing
            # trainer.global_step would misplace it for GANs, whose global_step counts both optimizers' steps
            logger.log_image(key=key, images=[str(path)])


def draws_images(model: L.LightningModule) -> bool:
    """Whether ImageLogger can draw the model's data: images (C, H, W) or 2D points; not sequences or text."""
    return len(tuple(getattr(model, "data_shape", (1, 1, 1)))) == 3 or is_2d(model)


class ImageLogger(Callback):
    """After validation epochs, draw samples, reconstructions, latent interpolations and traversals as grids.

    Uses only the model protocol: ``sample(n)``, and ``encode``/``decode`` where the model has them.
    Models of sequences (``data_shape`` neither (C, H, W) nor (2,)) are skipped.
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
        num_traversal_dims: latent traversals: for this many latent dimensions (one row each), the code of
            the first validation image with that dimension set to values from -3 to 3 (prior standard
            deviations for a VAE), ``interpolation_steps`` of them; 0 disables.
        num_points: for 2D data (models whose ``data_shape`` is (2,)): samples and validation points drawn
            as 2D histograms beside the heat map of the model's density ``exp(log_prob)``, all in one PNG
            (``density``) instead of image grids.
        resolution: pixels per side of each 2D panel.
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
        num_traversal_dims: int = 8,
        num_points: int = 5000,
        resolution: int = 128,
    ) -> None:
        check_positive(
            every_n_epochs=every_n_epochs, num_samples=num_samples, interpolation_steps=interpolation_steps,
            num_points=num_points, resolution=resolution,
        )  # fmt: skip
        if min(num_reconstructions, num_interpolations, num_traversal_dims) < 0:
            raise ValueError("num_reconstructions, num_interpolations and num_traversal_dims must be >= 0")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.num_reconstructions = num_reconstructions
        self.num_interpolations = num_interpolations
        self.interpolation_steps = interpolation_steps
        self.temperature = temperature
        self.seed = seed
        self.num_traversal_dims = num_traversal_dims
        self.num_points = num_points
        self.resolution = resolution
        self._inputs: tuple[Tensor, Tensor | None] | None = None
        self._points: list[Tensor] = []  # validation points of 2D data, up to num_points

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "sample", None)):
            raise TypeError(
                f"ImageLogger draws a model's samples, and {type(pl_module).__name__} has no sample(n); "
                "remove ImageLogger from its callbacks"
            )

    @override
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if not draws_images(pl_module):
            return
        if is_2d(pl_module) and dataloader_idx == 0 and sum(map(len, self._points)) < self.num_points:
            self._points.append(pl_module.unpack_batch(batch)[0].detach().cpu())
        # keep the first validation images as fixed inputs for reconstructions and interpolations
        if self._inputs is None and batch_idx == 0 and dataloader_idx == 0 and hasattr(pl_module, "unpack_batch"):
            x, y = pl_module.unpack_batch(batch)
            n = max(self.num_reconstructions, 2 * self.num_interpolations)
            self._inputs = (x[:n].detach(), None if y is None else y[:n].detach())

    @rank_zero_only
    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs or not draws_images(pl_module):
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
        if is_2d(model):
            points = torch.cat(self._points)[: self.num_points] if self._points else None
            return {"density": density_panels(model, points, value_range, self.num_points, self.resolution)}
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
        if self.num_traversal_dims > 0:
            grids["traversals"] = to_uint8_grid(self._traverse(model, x, y), value_range, self.interpolation_steps)
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

    def _traverse(self, model: L.LightningModule, x: Tensor, y: Tensor | None) -> Tensor:
        """Decode the first image's code with one latent dimension at a time swept from -3 to 3 (a row each)."""
        labels = None if y is None else y[:1]
        code = model.encode(x[:1], labels=labels)[0]  # (D,)
        dims = min(self.num_traversal_dims, code.shape[0])
        values = torch.linspace(-3, 3, self.interpolation_steps, device=code.device)
        z = code.repeat(dims, len(values), 1)  # (dims, steps, D)
        for dim in range(dims):
            z[dim, :, dim] = values
        row_labels = None if labels is None else labels.repeat(dims * len(values))
        return model.decode(z.flatten(0, 1), labels=row_labels)
