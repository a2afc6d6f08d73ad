"""Text samples and reconstructions of models over token sequences: files in the run directory and logger tables."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override

from callbacks.images import run_dir
from dgm_lightning.checks import check_non_negative, check_positive_int, check_temperature


def writes_text(model: L.LightningModule) -> bool:
    """Whether the model generates text: sequences of tokens it decodes with a vocabulary (a RecurrentVAE with the
    categorical likelihood)."""
    return callable(getattr(model, "sample_text", None)) and bool(getattr(model, "is_tokens", False))


class TextLogger(Callback):
    """After validation epochs, decode samples of the model and reconstructions of the first validation lines.

    The text counterpart of ``ImageLogger``, for models of token sequences (``RecurrentVAE`` with the
    categorical likelihood); uses their ``sample_text``, ``reconstruct`` and ``decode_text``. Files go to
    ``<run dir>/text/samples/epoch_XXXX.txt`` (a sample a line) and ``<run dir>/text/reconstructions/epoch_XXXX.tsv``
    (tab-separated ``input`` and ``reconstruction``, with that header); loggers with ``log_text`` (W&B) receive
    them as tables ``val/text_samples`` and ``val/text_reconstructions``. Draws with a fixed seed (the same noise
    every epoch, so progress is visible) without disturbing the training's random state. Runs on rank zero only.

    Args:
        every_n_epochs: write after every n-th validation epoch.
        num_samples: sampled lines.
        num_reconstructions: validation lines shown with their (greedy) reconstructions; 0 disables.
        temperature: sampling temperature (0: greedy decoding).
        seed: seed of the sampling noise.
    """

    def __init__(
        self,
        *,
        every_n_epochs: int = 1,
        num_samples: int = 16,
        num_reconstructions: int = 8,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        check_positive_int(every_n_epochs=every_n_epochs, num_samples=num_samples)
        check_non_negative(num_reconstructions=num_reconstructions)
        check_temperature(temperature)
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.num_reconstructions = num_reconstructions
        self.temperature = temperature
        self.seed = seed
        self._inputs: tuple[Tensor, Tensor] | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not writes_text(pl_module):
            likelihood = getattr(pl_module, "likelihood", None)
            what = f" (likelihood {likelihood!r})" if likelihood is not None else ""
            raise TypeError(
                f"TextLogger writes generated text, and {type(pl_module).__name__}{what} does not generate text: "
                "that takes a model of token sequences, a RecurrentVAE with likelihood categorical. "
                "Remove TextLogger from its callbacks"
            )

    @override
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        # keep the first validation lines as fixed inputs for the reconstructions
        if self._inputs is None and batch_idx == 0 and dataloader_idx == 0 and self.num_reconstructions > 0:
            x, lengths = pl_module.unpack_batch(batch)
            self._inputs = (x[: self.num_reconstructions].detach(), lengths[: self.num_reconstructions].detach())

    @override
    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []),
        ):
            torch.manual_seed(self.seed)
            tables = self.tables(pl_module)
        folder = run_dir(trainer) / "text"
        for kind, (columns, rows) in tables.items():
            suffix = "txt" if len(columns) == 1 else "tsv"
            save_and_log_table(
                trainer,
                f"val/text_{kind}",
                columns,
                rows,
                folder / kind / f"epoch_{trainer.current_epoch:04d}.{suffix}",
            )

    def tables(self, model: L.LightningModule) -> dict[str, tuple[list[str], list[list[str]]]]:
        """The tables to write, by kind: column names and rows of text."""
        samples = model.sample_text(self.num_samples, temperature=self.temperature)
        tables = {"samples": (["sample"], [[line] for line in samples])}
        if self._inputs is not None:
            x, lengths = (t.to(model.device) for t in self._inputs)
            inputs = model.decode_text(x)
            reconstructions = model.decode_text(model.reconstruct(x, lengths))
            tables["reconstructions"] = (
                ["input", "reconstruction"],
                [list(pair) for pair in zip(inputs, reconstructions, strict=True)],
            )
        return tables


def save_and_log_table(trainer: L.Trainer, key: str, columns: list[str], rows: list[list[str]], path: Path) -> None:
    """Write the rows as a text file (one column: a line each; more: tab-separated with a header), then hand them
    to every logger that takes text (W&B's log_text)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        if len(columns) == 1:
            file.writelines(f"{row[0]}\n" for row in rows)
        else:
            writer = csv.writer(file, delimiter="\t", lineterminator="\n")
            writer.writerows([columns, *rows])
    for logger in trainer.loggers:
        if hasattr(logger, "log_text"):
            # no step, as for the image grids: W&B files the table under the step of the scalars logged last
            logger.log_text(key=key, columns=columns, data=rows)
