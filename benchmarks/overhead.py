"""Framework overhead: our LightningModule in the Trainer vs a minimal hand-written PyTorch loop, per family.

    python benchmarks/overhead.py [--families AE VAE ...] [--epochs 6] [--repeats 3] [--json PATH]
    python benchmarks/overhead.py --profile VAE        # cProfile of the Trainer's steady-state epochs

Three loops train the same networks (the digits configs' models, the smallest steps and so the worst case for
overhead; ``--size 28`` the Fashion-MNIST-sized ones on noise images) on the same DataLoader batches with the
same optimizers: a hand-written loop that does only the model's loss, backward and the optimizer steps; the
Trainer with the thinnest LightningModule around that loss ("bare", Lightning's own cost); the Trainer with
our LightningModule ("ours": logging, divergence checks). Compared is the steady state: seconds per epoch,
the median over epochs 2..N (the first epoch, and the Trainer's set-up before it, are left out), the median over
interleaved repeats. Printed as steps/s and ratios (1.0 = no overhead); the target for ours/hand is >= 0.95.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the helpers beside it

import lightning as L  # noqa: E402
from common import (  # noqa: E402
    FAMILIES,
    FAMILY_NAMES,
    BareModule,
    EpochTimer,
    Family,
    SyntheticImages,
    add_common_args,
    apply_common_args,
    csv_logger,
    digits_data,
    hand_epoch_times,
    interleaved,
    machine,
    make_trainer,
    print_table,
    seeded,
    steady_seconds,
    trainer_epoch_times,
    write_json,
)

DIGITS = (1, 8, 8)


def data_for(family: Family, shape: tuple[int, int, int], batch_size: int, batches: int):
    """The digits for 8x8 (real data), noise images for other sizes (speed does not depend on the pixels)."""
    if shape == DIGITS:
        return digits_data(family, batch_size)
    return SyntheticImages(family, shape, batch_size, batches)


def measure(
    family: Family, *, epochs: int, repeats: int, shape: tuple[int, int, int] = DIGITS, batch_size: int = 64
) -> dict[str, float | int | str]:
    """Steady-state steps/s of the hand loop, of a bare LightningModule and of ours in the Trainer, and ratios."""
    data = data_for(family, shape, batch_size, batches=20)
    batches = len(data.train_dataloader())

    def model() -> L.LightningModule:
        return seeded(lambda: family.build(shape))

    seconds = interleaved(
        {
            "hand": lambda: steady_seconds(hand_epoch_times(family, model(), data, epochs, batches)),
            "bare": lambda: steady_seconds(trainer_epoch_times(BareModule(family, model()), data, epochs, batches)),
            "ours": lambda: steady_seconds(trainer_epoch_times(model(), data, epochs, batches)),
        },
        repeats,
    )
    rate = {name: batches / s for name, s in seconds.items()}
    return {
        "data": "digits" if shape == DIGITS else f"noise {shape[1]}x{shape[2]}",
        "steps_per_epoch": batches,
        "batch_size": batch_size,
        "hand_steps_per_s": rate["hand"],
        "bare_lightning_steps_per_s": rate["bare"],
        "trainer_steps_per_s": rate["ours"],
        "ratio": rate["ours"] / rate["hand"],
        "bare_lightning_ratio": rate["bare"] / rate["hand"],
        "ours_vs_bare_ratio": rate["ours"] / rate["bare"],
        "overhead_ms_per_step": (seconds["ours"] - seconds["hand"]) / batches * 1e3,
        # Lightning's own parity tests allow about 60 ms per epoch over a hand-written loop
        "overhead_ms_per_epoch": (seconds["ours"] - seconds["hand"]) * 1e3,
    }


def run(families: list[str], *, epochs: int, repeats: int, size: int = 8) -> dict[str, dict]:
    shape = (1, size, size)
    results = {name: measure(FAMILIES[name], epochs=epochs, repeats=repeats, shape=shape) for name in families}
    data = "digits" if shape == DIGITS else f"noise images {size}x{size}"
    print_table(
        f"Framework overhead, {data}, batch 64 (steps/s in the steady state: median of epochs 2..{epochs}, "
        f"median of {repeats} interleaved repeats; target ours/hand >= 0.95)",
        ["family", "hand", "bare Lightning", "ours", "ours/hand", "bare/hand", "ours/bare", "ms/step added",
         "ms/epoch added"],
        [
            [n, r["hand_steps_per_s"], r["bare_lightning_steps_per_s"], r["trainer_steps_per_s"], r["ratio"],
             r["bare_lightning_ratio"], r["ours_vs_bare_ratio"], r["overhead_ms_per_step"], r["overhead_ms_per_epoch"]]
            for n, r in results.items()
        ],
    )  # fmt: skip
    return results


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
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run; the first is not timed")
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many interleaved runs")
    parser.add_argument("--size", type=int, default=8, help="image size: 8 trains on the digits, others on noise")
    parser.add_argument("--profile", choices=FAMILY_NAMES, help="profile this family's Trainer run instead")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    if args.profile:
        profile(FAMILIES[args.profile], epochs=args.epochs, shape=(1, args.size, args.size))
        return {}
    overhead = run(args.families, epochs=args.epochs, repeats=args.repeats, size=args.size)
    results = {"machine": machine(), "overhead": overhead}
    if args.json:
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
