"""Write what ``Trainer.predict`` returns to disk: tensors, image grids and decoded text."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from callbacks.images import save_png, to_uint8_grid


class PredictionWriter(BasePredictionWriter):
    """Write what ``predict`` returns (dicts of tensors per batch) to disk: one ``.pt`` and one PNG grid per key.

    Lists of strings (decoded text of sequence models) are written as ``<key>.txt``, one line per example.

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
            if isinstance(predictions[0][key], list):  # text (sequence models): one line per example
                lines = [str(line).replace("\n", " ") for batch in predictions for line in batch[key]]
                (folder / f"{key}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
                continue
            tensor = torch.cat([batch[key].cpu() for batch in predictions])
            torch.save(tensor, folder / f"{key}.pt")
            if tensor.dim() == 4:
                save_png(to_uint8_grid(tensor[:64], value_range, nrow=8), folder / f"{key}.png")
        rank_zero_info(f"Predictions written to {folder}")
