"""Benchmark: train Glow or RealNVP on Fashion-MNIST for a fixed time budget, then print test bits/dim.

    python benchmarks/flow_fashion_mnist.py --architecture glow --minutes 60
    python benchmarks/flow_fashion_mnist.py --architecture realnvp --minutes 60 --accelerator gpu

Reads the four original files from /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist)
when present, otherwise from --data-dir, downloading them with --download. The test set is the official
10,000 images; bits/dim are those of the 8-bit data (256 levels), the number papers report
(about 2.9-3.0 for Glow/RealNVP-sized models trained to convergence).
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import lightning as L
import torch

from dgm_lightning import Flow

SYSTEM_DATA = Path("/usr/share/datasets/fashion-mnist")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--architecture", choices=["glow", "realnvp"], default="glow")
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget (wall clock)")
    parser.add_argument("--num-scales", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=8, help="flow steps per scale")
    parser.add_argument(
        "--hidden-dims", type=int, nargs="+", default=[128, 128], help="channels of the coupling nets' hidden layers"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--data-dir", default=str(SYSTEM_DATA) if SYSTEM_DATA.exists() else "data")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from datamodules import FashionMNISTDataModule  # here so that --help works without the DataModules

    L.seed_everything(args.seed)
    data = FashionMNISTDataModule(data_dir=args.data_dir, download=args.download, batch_size=args.batch_size)
    model = Flow(
        args.architecture, data_shape=(1, 28, 28), num_scales=args.num_scales, num_steps=args.num_steps,
        hidden_dims=args.hidden_dims, quantization_levels=256, optimizer=partial(torch.optim.Adam, lr=args.lr),
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, max_time=timedelta(minutes=args.minutes), max_epochs=-1,
        gradient_clip_val=50.0, logger=False, enable_checkpointing=False, limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    minutes = (time.perf_counter() - start) / 60
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    print(
        f"{args.architecture} on Fashion-MNIST: {trainer.global_step} steps in {minutes:.1f} min, "
        f"test bits/dim {metrics['test/bpd']:.3f} (test NLL {metrics['test/nll']:.1f} nats in [0, 1] units)"
    )
    return metrics


if __name__ == "__main__":
    main()
