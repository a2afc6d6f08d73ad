"""Framework overhead: our LightningModule in the Trainer vs a minimal hand-written PyTorch loop.

    python benchmarks/overhead.py [--epochs 5] [--repeats 3] [--json results.json]

Both train the same networks on the same in-memory batches (digits, batch 64) with the same optimizer;
the hand loop does only forward, backward and step. Printed side by side as steps/s and their ratio,
measured in one run (absolute times vary on shared machines; the ratio is what to compare).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning as L
import torch

from datamodules import DigitsDataModule
from dgm_lightning import AE, VAE


def hand_loop(model, loader, epochs: int) -> float:
    """Steps per second of the bare loop: what the Trainer is compared with."""
    optimizer = model.configure_optimizers()
    model.train()
    steps, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _labels in loader:
            optimizer.zero_grad(set_to_none=True)
            model.loss_terms(x, None)[0]["loss"].backward()
            optimizer.step()
            steps += 1
    return steps / (time.perf_counter() - start)


def trainer_loop(model, data, epochs: int) -> float:
    """Steps per second in the Trainer, validation and checkpointing off, logging on as in real runs."""
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=L.pytorch.loggers.CSVLogger("runs/benchmarks"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return trainer.global_step / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many interleaved runs")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    data = DigitsDataModule(batch_size=64)
    data.setup()
    results = {}
    for name, cls in {"AE": AE, "VAE": VAE}.items():
        rates: dict[str, list[float]] = {"hand": [], "trainer": []}
        for _ in range(args.repeats):  # interleaved, so that a busy moment of the machine hits both
            for loop in rates:
                L.seed_everything(0, verbose=False)
                model = cls(latent_dim=8, img_shape=(1, 8, 8), hidden_dims=[256, 128])
                run = trainer_loop(model, data, args.epochs) if loop == "trainer" else None
                rates[loop].append(run or hand_loop(model, data.train_dataloader(), args.epochs))
        hand, ours = statistics.median(rates["hand"]), statistics.median(rates["trainer"])
        results[name] = {"hand_steps_per_s": hand, "trainer_steps_per_s": ours, "ratio": ours / hand}
        print(
            f"{name:>4}: hand loop {hand:7.1f} steps/s | Trainer {ours:7.1f} steps/s | Trainer/hand {ours / hand:.3f}"
        )
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
