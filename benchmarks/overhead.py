"""Same-net parity: our LightningModule in the Trainer vs a minimal hand-written PyTorch loop, per family.

    python benchmarks/overhead.py [--families AE VAE ...] [--steps 100] [--repeats 3] [--json PATH]
    python benchmarks/overhead.py --size 28 --batch-size 128      # Fashion-MNIST-sized nets, on noise images
    python benchmarks/overhead.py --profile VAE                   # cProfile of the Trainer's steady-state epochs

Three loops train the same networks (the digits configs' models, the smallest steps and so the worst case for
overhead; ``--size 28`` the Fashion-MNIST-sized ones on noise images) on the same DataLoader batches with the
same optimizers: a hand-written loop that does only the model's loss, backward and the optimizer steps; the
Trainer with the thinnest LightningModule around that loss ("bare", Lightning's own cost); the Trainer with
our LightningModule ("ours": logging to CSV at the default interval, divergence checks). Each measurement is
the mean time per step over ``--steps`` timed steps (at least 100) after a warm-up epoch (the Trainer's set-up
and the first epoch left out); the loops run in ``--repeats`` interleaved rounds, and the ratios of paired rounds
are printed as median (min-max). The target for ours/hand is >= 0.97; a ratio whose repeats disagree by more than
10 % is reported as unsettled instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the helpers beside it

import lightning as L  # noqa: E402
from common import (  # noqa: E402
    FAMILIES,
    FAMILY_NAMES,
    MIN_TIMED_STEPS,
    BareModule,
    EpochTimer,
    Family,
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
    print_table,
    seconds_per_step,
    seeded,
    trainer_epoch_times,
    verdict,
    write_json,
)

DIGITS = (1, 8, 8)
TARGET = 0.97  # ours / hand steps per second


def data_for(family: Family, shape: tuple[int, int, int], batch_size: int, batches: int):
    """The digits for 8x8 (real data), noise images for other sizes (speed does not depend on the pixels)."""
    if shape == DIGITS:
        return digits_data(family, batch_size)
    return SyntheticImages(family, shape, batch_size, batches)


def measure(
    family: Family, *, steps: int, repeats: int, shape: tuple[int, int, int] = DIGITS, batch_size: int = 64
) -> dict[str, Any]:
    """Seconds per step of the hand loop, of a bare LightningModule and of ours in the Trainer, and the ratios of
    their steps per second, each over interleaved repeats."""
    data = data_for(family, shape, batch_size, batches=20)
    batches = len(data.train_dataloader())
    epochs = epochs_for(batches, steps)

    def model() -> L.LightningModule:
        return seeded(lambda: family.build(shape))

    seconds = interleaved(
        {
            "hand": lambda: seconds_per_step(hand_epoch_times(family, model(), data, epochs, batches), batches),
            "bare": lambda: seconds_per_step(
                trainer_epoch_times(BareModule(family, model()), data, epochs, batches), batches
            ),
            "ours": lambda: seconds_per_step(trainer_epoch_times(model(), data, epochs, batches), batches),
        },
        repeats,
    )
    ratio = Spread.of_ratios(seconds["hand"], seconds["ours"])  # steps/s ours over steps/s hand
    return {
        "data": "digits" if shape == DIGITS else f"noise {shape[1]}x{shape[2]}",
        "batch_size": batch_size,
        "timed_steps": (epochs - 1) * batches,
        "ms_per_step": {name: Spread(tuple(1e3 * t for t in v)).as_dict() for name, v in seconds.items()},
        "ratio": ratio.as_dict(),
        "bare_lightning_ratio": Spread.of_ratios(seconds["hand"], seconds["bare"]).as_dict(),
        "ours_vs_bare_ratio": Spread.of_ratios(seconds["bare"], seconds["ours"]).as_dict(),
        "verdict": verdict(ratio, TARGET),
    }


def run(
    families: list[str], *, steps: int = MIN_TIMED_STEPS, repeats: int = 3, size: int = 8, batch_size: int = 64
) -> dict[str, dict]:
    shape = (1, size, size)
    results = {
        name: measure(FAMILIES[name], steps=steps, repeats=repeats, shape=shape, batch_size=batch_size)
        for name in families
    }
    data = "digits" if shape == DIGITS else f"noise images {size}x{size}"
    print_table(
        f"Same-net parity, {data}, batch {batch_size}: ms per step, mean of >= {steps} timed steps; ratios of steps/s "
        f"over {repeats} interleaved repeats, median (min-max); target ours/hand >= {TARGET}",
        ["family", "hand ms", "bare ms", "ours ms", "ours/hand", "bare/hand", "ours/bare", "verdict"],
        [
            [n, r["ms_per_step"]["hand"]["median"], r["ms_per_step"]["bare"]["median"],
             r["ms_per_step"]["ours"]["median"], spread_text(r["ratio"]), spread_text(r["bare_lightning_ratio"]),
             spread_text(r["ours_vs_bare_ratio"]), r["verdict"]]
            for n, r in results.items()
        ],
    )  # fmt: skip
    return results


def spread_text(spread: dict[str, Any]) -> str:
    return str(Spread(tuple(spread["values"])))


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
    parser.add_argument("--profile", choices=FAMILY_NAMES, help="profile this family's Trainer run instead")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    if args.profile:
        profile(FAMILIES[args.profile], epochs=args.epochs, shape=(1, args.size, args.size))
        return {}
    overhead = run(args.families, steps=args.steps, repeats=args.repeats, size=args.size, batch_size=args.batch_size)
    results = {"machine": machine(), "overhead": overhead}
    if args.json:
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
