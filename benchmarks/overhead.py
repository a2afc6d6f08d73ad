"""Same-net parity: our LightningModule in the Trainer vs a minimal hand-written PyTorch loop, per family; and
the memory of a training step in both.

    python benchmarks/overhead.py [--families AE VAE ...] [--steps 100] [--repeats 3] [--json PATH]
    python benchmarks/overhead.py --size 28 --batch-size 32       # Fashion-MNIST-sized nets (run.py's point)
    python benchmarks/overhead.py --memory                        # also the memory tables (28x28, batch 128)
    python benchmarks/overhead.py --profile VAE                   # cProfile of the Trainer's steady-state epochs

Three loops train the same networks (by default the digits configs' models, the smallest steps and so the worst case
for overhead; ``--size 28`` the Fashion-MNIST-sized ones on noise images) on the same DataLoader batches with the
same optimizers, the same memory format (``channels_last`` where ours uses it) and the same precision, float32
(parity measures the loops, not the arithmetic; ``peers.py`` measures ours in its default precision): a hand-written
loop that does only the model's loss, backward and the optimizer steps; the Trainer with the thinnest
LightningModule around that loss ("bare", Lightning's own cost); the Trainer with our LightningModule ("ours":
logging to CSV at the default interval, divergence checks). Each measurement is the mean time per step over
``--steps`` timed steps (at least 100) after a warm-up epoch (the Trainer's set-up and the first epoch left out);
the loops run in ``--repeats`` interleaved rounds, and the ratios of paired rounds are printed as median (min-max).
The target for ours/hand is >= 0.97; a ratio whose repeats disagree by more than 10 % is reported as unsettled.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the helpers beside it

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    FAMILIES,
    FAMILY_NAMES,
    MIN_TIMED_STEPS,
    BareModule,
    EpochTimer,
    Family,
    PeakMemory,
    Spread,
    SyntheticImages,
    add_common_args,
    apply_common_args,
    csv_logger,
    digits_data,
    epochs_for,
    hand_epoch_times,
    interleaved,
    machine,
    make_trainer,
    optimizers_of,
    print_table,
    seconds_per_step,
    seeded,
    trainer_epoch_times,
    training_layout,
    verdict,
    write_json,
)

from dgm_lightning import VAE  # noqa: E402

DIGITS = (1, 8, 8)
TARGET = 0.97  # ours / hand steps per second
MEMORY_TARGET = 1.1  # ours / hand peak memory of a training step


def data_for(family: Family, shape: tuple[int, int, int], batch_size: int, batches: int):
    """The digits for 8x8 (real data), noise images for other sizes (speed does not depend on the pixels)."""
    if shape == DIGITS:
        return digits_data(family, batch_size)
    return SyntheticImages(family, shape, batch_size, batches)


def measure(
    family: Family,
    *,
    steps: int,
    repeats: int,
    shape: tuple[int, int, int] = DIGITS,
    batch_size: int = 64,
    bare: bool = True,
) -> dict[str, Any]:
    """Seconds per step of the hand loop, of a bare LightningModule (unless not ``bare``) and of ours in the
    Trainer, and the ratios of their steps per second, each over interleaved repeats."""
    data = data_for(family, shape, batch_size, batches=20)
    batches = len(data.train_dataloader())
    epochs = epochs_for(batches, steps)

    def model() -> L.LightningModule:
        return seeded(lambda: family.build(shape))

    loops = {
        "hand": lambda: seconds_per_step(hand_epoch_times(family, model(), data, epochs, batches), batches),
        "bare": lambda: seconds_per_step(
            trainer_epoch_times(BareModule(family, model()), data, epochs, batches), batches
        ),
        "ours": lambda: seconds_per_step(trainer_epoch_times(model(), data, epochs, batches), batches),
    }
    seconds = interleaved(loops if bare else {k: v for k, v in loops.items() if k != "bare"}, repeats)
    ratio = Spread.of_ratios(seconds["hand"], seconds["ours"])  # steps/s ours over steps/s hand
    result = {
        "data": "digits" if shape == DIGITS else f"noise {shape[1]}x{shape[2]}",
        "batch_size": batch_size,
        "timed_steps": (epochs - 1) * batches,
        "ms_per_step": {name: Spread(tuple(1e3 * t for t in v)).as_dict() for name, v in seconds.items()},
        "ratio": ratio.as_dict(),
        "verdict": verdict(ratio, TARGET),
    }
    if "bare" in seconds:
        result["bare_lightning_ratio"] = Spread.of_ratios(seconds["hand"], seconds["bare"]).as_dict()
        result["ours_vs_bare_ratio"] = Spread.of_ratios(seconds["bare"], seconds["ours"]).as_dict()
    return result


class MemoryWindow(L.Callback):
    """Peak memory of training steps ``first`` to ``last`` in the Trainer (the earlier ones warm up; what runs at
    the epoch's end is not a step)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.memory = first, last, PeakMemory()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            self.memory.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last:
            self.memory.__exit__(None, None, None)


def step_memory(family: Family, shape: tuple[int, int, int], batch_size: int, warm_up: int = 2, steps: int = 4):
    """Peak MiB above the resident set at its start, over ``steps`` training steps after ``warm_up`` (gradients and
    optimizer state exist by then), of the hand loop and of ours in the Trainer; and ours / hand."""
    data = SyntheticImages(family, shape, batch_size, warm_up + steps)
    model = training_layout(seeded(lambda: family.build(shape)))
    optimizers = optimizers_of(model)
    batches = iter(data.train_dataloader())
    for _ in range(warm_up):
        family.step(model, optimizers, next(batches))
    with PeakMemory() as hand:
        for batch in batches:
            family.step(model, optimizers, batch)
    window = MemoryWindow(warm_up, warm_up + steps - 1)
    make_trainer(callbacks=[window], logger=csv_logger()).fit(seeded(lambda: family.build(shape)), datamodule=data)
    ours = window.memory.peak_mib
    return {"hand_mib": hand.peak_mib, "ours_mib": ours, "ratio": ours / hand.peak_mib}


def memory(families: list[str], *, size: int = 28, batch_size: int = 128) -> dict[str, dict]:
    """Each family's training-step memory, ours against the hand loop (``step_memory``), as a table."""
    shape = (1, size, size)
    results = {name: step_memory(FAMILIES[name], shape, batch_size) for name in families}
    print_table(
        f"Training-step memory, noise images {size}x{size}, batch {batch_size}: peak MiB above the resident set "
        f"at the start of 4 steps (after 2 warm-up steps); target ours/hand <= {MEMORY_TARGET}",
        ["family", "hand MiB", "ours MiB", "ours/hand", "verdict"],
        [[n, r["hand_mib"], r["ours_mib"], r["ratio"], "meets" if r["ratio"] <= MEMORY_TARGET else "above"]
         for n, r in results.items()],
    )  # fmt: skip
    return results


def iwae_memory(chunk_sizes=(1, 10, 100), samples: int = 100, batch_size: int = 128) -> dict[str, dict]:
    """Peak MiB of the conv VAE's IWAE estimate (``log_prob``, as ``test/nll`` computes it) with ``samples``
    importance samples on one evaluation batch of 28x28 images, and its time, for each ``iwae_chunk_size``."""
    shape, x = (1, 28, 28), torch.rand(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    results = {}
    for chunk in chunk_sizes:
        build = partial(
            VAE, 32, data_shape=shape, architecture="conv", hidden_dims=[32, 64, 128], iwae_chunk_size=chunk
        )
        model = seeded(build).eval()
        start = time.perf_counter()
        with torch.no_grad(), PeakMemory() as peak:
            model.log_prob(x, num_samples=samples)
        results[str(chunk)] = {"peak_mib": peak.peak_mib, "seconds": time.perf_counter() - start}
    print_table(
        f"IWAE evaluation memory: conv VAE, {samples} samples, one batch of {batch_size} 28x28 images, peak MiB "
        "above the resident set at the start",
        ["iwae_chunk_size", "peak MiB", "seconds"],
        [[c, r["peak_mib"], r["seconds"]] for c, r in results.items()],
    )
    return results


def run(
    families: list[str],
    *,
    steps: int = MIN_TIMED_STEPS,
    repeats: int = 3,
    size: int = 8,
    batch_size: int = 64,
    bare: bool = True,
) -> dict[str, dict]:
    shape = (1, size, size)
    results = {
        name: measure(FAMILIES[name], steps=steps, repeats=repeats, shape=shape, batch_size=batch_size, bare=bare)
        for name in families
    }
    data = "digits" if shape == DIGITS else f"noise images {size}x{size}"
    print_table(
        f"Same-net parity, {data}, batch {batch_size}: ms per step, mean of >= {steps} timed steps; ratios of steps/s "
        f"over {repeats} interleaved repeats, median (min-max); target ours/hand >= {TARGET}",
        ["family", "hand ms", "bare ms", "ours ms", "ours/hand", "bare/hand", "ours/bare", "verdict"],
        [
            [n, r["ms_per_step"]["hand"]["median"], r["ms_per_step"].get("bare", {}).get("median", "-"),
             r["ms_per_step"]["ours"]["median"], spread_text(r["ratio"]), spread_text(r.get("bare_lightning_ratio")),
             spread_text(r.get("ours_vs_bare_ratio")), r["verdict"]]
            for n, r in results.items()
        ],
    )  # fmt: skip
    return results


def spread_text(spread: dict[str, Any] | None) -> str:
    return "-" if spread is None else str(Spread(tuple(spread["values"])))


def profile(family: Family, *, epochs: int, shape: tuple[int, int, int] = DIGITS, top: int = 30) -> None:
    """Print where the Trainer's time goes in epochs 2..N: the first epoch runs before profiling starts."""
    data = data_for(family, shape, 64, batches=20)
    model = seeded(lambda: family.build(shape))
    profiler = cProfile.Profile()

    class Profiled(EpochTimer):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            super().on_train_epoch_start(trainer, pl_module)
            if trainer.current_epoch == 1:
                profiler.enable()

    trainer = make_trainer(max_epochs=epochs, callbacks=[Profiled()], logger=csv_logger())
    trainer.fit(model, datamodule=data)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=FAMILY_NAMES, default=list(FAMILY_NAMES))
    parser.add_argument("--steps", type=int, default=MIN_TIMED_STEPS, help="timed steps per measurement (>= 100)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three loops")
    parser.add_argument("--size", type=int, default=8, help="image size: 8 trains on the digits, others on noise")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6, help="--profile: epochs of the profiled run")
    parser.add_argument("--memory", action="store_true", help="also each family's training-step memory (28x28, b128)")
    parser.add_argument("--profile", choices=FAMILY_NAMES, help="profile this family's Trainer run instead")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    if args.profile:
        profile(FAMILIES[args.profile], epochs=args.epochs, shape=(1, args.size, args.size))
        return {}
    overhead = run(args.families, steps=args.steps, repeats=args.repeats, size=args.size, batch_size=args.batch_size)
    results = {"machine": machine(), "overhead": overhead}
    if args.memory:
        results["memory"] = memory(args.families)
        results["iwae_memory"] = iwae_memory()
    if args.json:
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
