"""Write what ``Trainer.predict`` returns to disk: tensors, image grids and decoded text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from callbacks.images import save_png, to_uint8_grid
from dgm_lightning.runs import new_run_id


class PredictionWriter(BasePredictionWriter):
    """Write what ``predict`` returns (dicts of tensors per batch) to disk: one ``.pt`` and one PNG grid per key.

    Lists of strings (decoded text of sequence models) are written as ``<key>.txt``, one line per example.

    Args:
        output_dir: folder for the files, which must not hold files yet; by default
            ``<default_root_dir>/predictions/<date-time>-<random digits>``, a new folder for every run, so that
            nothing is written over, even by a job started in the same second.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # before predicting, not after: an occupied folder must not cost the predictions
        if stage == "predict" and trainer.is_global_zero and self.output_dir:
            check_empty(Path(self.output_dir))

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        if not trainer.is_global_zero or not predictions:
            return
        folder = Path(self.output_dir or Path(trainer.default_root_dir, "predictions", new_run_id()))
        check_empty(folder)
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


def check_empty(folder: Path) -> None:
    """Refuse a folder that already holds files: they would be written over, or mixed with this run's."""
    if folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(
            f"PredictionWriter: {folder} already holds files (of another predict run?), which would be written over; "
            "give another --trainer.callbacks.output_dir, or leave it out for a new folder under "
            "<default_root_dir>/predictions/"
        )
