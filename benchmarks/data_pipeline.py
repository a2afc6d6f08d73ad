"""Is a training step limited by the data pipeline? Time per batch of loading alone vs a full training step.

    python benchmarks/data_pipeline.py [--data-dir /usr/share/datasets/fashion-mnist] [--batches 100]

Uses Fashion-MNIST when its files are there, else the digits; prints milliseconds per batch side by side
and the share of a training step spent fetching data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch

from datamodules import DigitsDataModule, FashionMNISTDataModule
from dgm_lightning import VAE


def ms_per_batch(loader, batches: int, step=None) -> float:
    """Mean wall time of fetching (and, with ``step``, training on) ``batches`` batches, after one warm-up."""
    iterator = iter(loader)
    batch = next(iterator)
    if step is not None:
        step(batch)
    start = time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        if step is not None:
            step(batch)
    return (time.perf_counter() - start) / batches * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    if Path(args.data_dir).is_dir():
        data, arch = (
            FashionMNISTDataModule(args.data_dir, batch_size=128),
            dict(architecture="conv", data_shape=(1, 28, 28)),
        )
    else:
        data, arch = DigitsDataModule(batch_size=128), dict(architecture="mlp", data_shape=(1, 8, 8))
    data.setup()
    model = VAE(latent_dim=32, **arch)
    optimizer = model.configure_optimizers()["optimizer"]

    def train_step(batch) -> None:
        optimizer.zero_grad()
        model.objective(batch).loss.backward()
        optimizer.step()

    loading = ms_per_batch(data.train_dataloader(), args.batches)
    training = ms_per_batch(data.train_dataloader(), args.batches, train_step)
    print(f"{type(data).__name__}, batch 128, {torch.get_num_threads()} threads")
    print(f"{'loading only':>24}: {loading:8.2f} ms/batch")
    print(f"{'loading + VAE step':>24}: {training:8.2f} ms/batch")
    print(f"{'share spent loading':>24}: {loading / training:8.1%}")


if __name__ == "__main__":
    main()
