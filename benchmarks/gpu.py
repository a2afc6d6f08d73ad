"""GPU throughput per family: fp32 and bf16-mixed, contiguous and channels_last weights, with and without
torch.compile, and DDP on one GPU against all of them.

    python benchmarks/gpu.py [--families VAE GAN ...] [--size 32] [--batch-size 256] [--json PATH]

Needs a CUDA GPU (it says so and stops on a machine without one). Each measurement trains our LightningModule
in the Trainer on noise images (speed does not depend on the pixels) for a warm-up epoch (compilation, cuDNN's
autotuning) and at least 100 timed steps, and reports examples per second over all devices. The settings run in
interleaved rounds (``--repeats``), printed as median (min-max). Results go to ``--json`` (default
benchmarks/results/gpu.json) with the card's name, for README's Benchmarks section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the helpers beside it

import torch  # noqa: E402
from common import (  # noqa: E402
    FAMILIES,
    FAMILY_NAMES,
    MIN_TIMED_STEPS,
    RESULTS,
    EpochTimer,
    Spread,
    SyntheticImages,
    add_common_args,
    apply_common_args,
    epochs_for,
    interleaved,
    machine,
    make_trainer,
    print_table,
    seconds_per_step,
    seeded,
    write_json,
)

# name: (precision, channels_last, compile); the last is what a GPU recipe would use if it wins
SETTINGS = {
    "fp32": ("32-true", False, False),
    "fp32 channels_last": ("32-true", True, False),
    "bf16-mixed channels_last": ("bf16-mixed", True, False),
    "bf16-mixed channels_last compile": ("bf16-mixed", True, True),
}
DDP_SETTING = "bf16-mixed channels_last"
BATCHES = 25  # per epoch: epochs_for gives a warm-up epoch and >= 100 timed steps


def examples_per_s(family_name: str, setting: str, size: int, batch_size: int, devices: int = 1) -> float:
    """Examples per second over all ``devices`` of one training run in one setting."""
    family = FAMILIES[family_name]
    precision, channels_last, compile = SETTINGS[setting]
    shape = (1, size, size)
    model = seeded(lambda: family.build(shape))
    model.channels_last, model.compile_networks = channels_last, compile  # the models' own options
    timer = EpochTimer()
    trainer = make_trainer(
        max_epochs=epochs_for(BATCHES), limit_train_batches=BATCHES, callbacks=[timer], accelerator="gpu",
        devices=devices, precision=precision, strategy="ddp" if devices > 1 else "auto",
    )  # fmt: skip
    trainer.fit(model, datamodule=SyntheticImages(family, shape, batch_size, BATCHES * devices))
    return batch_size * devices / seconds_per_step(timer.epoch_times, BATCHES)


def run(families: list[str], *, size: int, batch_size: int, repeats: int) -> dict:
    results: dict = {}
    for name in families:
        runs = {s: partial(examples_per_s, name, s, size, batch_size) for s in SETTINGS}
        values = interleaved(runs, repeats)
        results[name] = {s: Spread(tuple(v)).as_dict() for s, v in values.items()}
        base = values["fp32"]
        results[name]["speed-up over fp32"] = {s: Spread.of_ratios(v, base).as_dict() for s, v in values.items()}
    print_table(
        f"GPU ({torch.cuda.get_device_name(0)}): examples/s, {size}x{size} noise, batch {batch_size}, "
        f">= {MIN_TIMED_STEPS} timed steps, median (min-max) of {repeats} interleaved rounds",
        ["family", *SETTINGS],
        [[n, *(str(Spread(tuple(r[s]["values"]))) for s in SETTINGS)] for n, r in results.items()],
    )
    return results


def ddp(families: list[str], *, size: int, batch_size: int) -> dict:
    """Examples/s of one setting on one GPU and on all of them (DDP, the same batch per GPU). Each DDP run is a
    process of its own (``--ddp-family``), as Lightning's DDP launcher starts this script again once per GPU."""
    count, setting = torch.cuda.device_count(), DDP_SETTING
    results = {}
    for name in families:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "ddp.json"
            command = [sys.executable, __file__, "--ddp-family", name, "--size", str(size), "--batch-size",
                       str(batch_size), "--json", str(out)]  # fmt: skip
            subprocess.run(command, check=True)
            all_gpus = json.loads(out.read_text())["examples_per_s"]
        one = examples_per_s(name, setting, size, batch_size)
        results[name] = {"1 GPU": one, f"{count} GPUs": all_gpus, "scaling efficiency": all_gpus / (count * one)}
    print_table(
        f"DDP ({setting}): examples/s on 1 and {count} GPUs, batch {batch_size} per GPU",
        ["family", "1 GPU", f"{count} GPUs", "efficiency"],
        [[n, *r.values()] for n, r in results.items()],
    )
    return results


def ddp_run(name: str, size: int, batch_size: int, out: str) -> None:
    """One family on every GPU (each rank runs this; rank 0 writes the examples/s)."""
    value = examples_per_s(name, DDP_SETTING, size, batch_size, devices=torch.cuda.device_count())
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        write_json({"examples_per_s": value}, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=FAMILY_NAMES, default=list(FAMILY_NAMES))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ddp-family", choices=FAMILY_NAMES, help="(internal) one DDP run on every GPU")
    add_common_args(parser)
    parser.set_defaults(threads=0, json=str(RESULTS / "gpu.json"))  # the data loader's threads: torch's choice
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(1, "benchmarks/gpu.py needs a CUDA GPU; this machine has none (CPU figures: run.py)\n")
    apply_common_args(args)
    torch.backends.cudnn.benchmark = True
    if args.ddp_family:
        ddp_run(args.ddp_family, args.size, args.batch_size, args.json)
        return {}
    results = {"machine": machine(), "size": args.size, "batch_size": args.batch_size}
    results["settings"] = run(args.families, size=args.size, batch_size=args.batch_size, repeats=args.repeats)
    results["ddp"] = ddp(args.families, size=args.size, batch_size=args.batch_size)
    print(f"results: {write_json(results, args.json)}")
    return results


if __name__ == "__main__":
    main()
