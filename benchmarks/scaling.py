"""Scaling: training steps/s, examples/s and peak memory against batch size and image size, one model per family.

    python benchmarks/scaling.py [--batch-sizes 32 64 ... 1024] [--image-sizes 28 32 64] [--steps 10]
    python benchmarks/scaling.py --accelerator gpu --precision bf16-mixed [--contiguous] [--compile]

Each point trains our LightningModule in the Trainer on noise images (speed does not depend on the pixels) for
one warm-up step and ``--steps`` timed steps; the step time is the median of the timed ones, data loading left
out. Memory is the peak the training run added to the process: on the CPU its peak resident set size over the
resident set before (torch's CPU tensors are invisible to tracemalloc), on a GPU the CUDA allocator's peak.
Cost should grow no worse than linearly with the batch: the time per example at the largest batch over that at
the smallest is printed, and should be <= 1 (up to noise; the check allows 20 %).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the helpers beside it

from common import (  # noqa: E402
    FAMILIES,
    PeakMemory,
    StepTimer,
    SyntheticImages,
    add_common_args,
    apply_common_args,
    machine,
    make_trainer,
    print_table,
    seeded,
    write_json,
)

SCALING_FAMILIES = ("VAE", "GAN", "Flow", "RecurrentVAE")
LINEAR_TOLERANCE = 1.2  # per-example time may rise this much from the smallest to the largest batch (noise)


def measure_point(
    family_name: str, size: int, batch_size: int, steps: int, *, accelerator: str = "cpu",
    precision: str | None = None, channels_last: bool = True, compile: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Median step time, throughput and peak memory of one (family, image size, batch size) point."""
    family = FAMILIES[family_name]
    shape = (1, size, size)
    data = SyntheticImages(family, shape, batch_size, steps + 1)
    model = seeded(lambda: family.build(shape))
    model.channels_last, model.compile_networks = channels_last, compile  # the models' own options (GenerativeModel)
    timer = StepTimer()
    trainer = make_trainer(callbacks=[timer], accelerator=accelerator, precision=precision)
    with PeakMemory("cuda" if accelerator in ("gpu", "cuda") else "cpu") as memory:
        trainer.fit(model, datamodule=data)
    step = statistics.median(timer.times[1:])
    return {
        "image_size": size,
        "batch_size": batch_size,
        "steps_per_s": 1 / step,
        "examples_per_s": batch_size / step,
        "ms_per_example": step / batch_size * 1e3,
        "peak_memory_mib": memory.peak_mib,
    }


def sweep(family_name: str, batch_sizes: list[int], image_sizes: list[int], steps: int, **options) -> dict:
    """Batch sizes at the first image size, then image sizes at batch 64; each list in increasing order."""
    base_size = image_sizes[0]
    by_batch = [measure_point(family_name, base_size, b, steps, **options) for b in sorted(batch_sizes)]
    by_size = [measure_point(family_name, s, 64, steps, **options) for s in sorted(image_sizes)]
    ratio = by_batch[-1]["ms_per_example"] / by_batch[0]["ms_per_example"]
    return {
        "by_batch_size": by_batch,
        "by_image_size": by_size,
        "per_example_time_ratio": ratio,
        "at_most_linear": ratio <= LINEAR_TOLERANCE,
    }


def run(families: list[str], batch_sizes: list[int], image_sizes: list[int], steps: int, **options) -> dict:
    results = {name: sweep(name, batch_sizes, image_sizes, steps, **options) for name in families}
    rows = []
    for name, r in results.items():
        for point in r["by_batch_size"] + r["by_image_size"]:
            rows.append([name, point["image_size"], point["batch_size"], point["steps_per_s"],
                         point["examples_per_s"], point["peak_memory_mib"]])  # fmt: skip
    print_table(
        f"Scaling ({steps} timed steps per point, our modules in the Trainer; memory: peak added to the process)",
        ["family", "image", "batch", "steps/s", "examples/s", "peak MiB"],
        rows,
    )
    print_table(
        f"Time per example, batch {max(batch_sizes)} over batch {min(batch_sizes)} (<= 1: no worse than linear)",
        ["family", "ratio", f"<= {LINEAR_TOLERANCE}"],
        [[name, r["per_example_time_ratio"], r["at_most_linear"]] for name, r in results.items()],
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=SCALING_FAMILIES, default=list(SCALING_FAMILIES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[28, 32, 64])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per point (after one warm-up step)")
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    parser.add_argument("--precision", default=None, help="e.g. bf16-mixed (GPU)")
    parser.add_argument("--contiguous", action="store_true", help="contiguous weights, not the default channels_last")
    parser.add_argument("--compile", action="store_true", help="compile the networks (the models' compile=True)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    options = dict(accelerator=args.accelerator, precision=args.precision, channels_last=not args.contiguous,
                   compile=args.compile)  # fmt: skip
    scaling = run(args.families, args.batch_sizes, args.image_sizes, args.steps, **options)
    results = {"machine": machine(), "scaling_options": options, "scaling": scaling}
    if args.json:
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
