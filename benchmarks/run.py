"""All benchmarks in one run: same-net parity, step memory, scaling, quality at a fixed budget, peers; tables,
JSON, plot.

    python benchmarks/run.py --quick                  # under 10 minutes on 2 CPU cores
    python benchmarks/run.py                          # under 30 minutes: longer budgets, every scaling point
    python benchmarks/run.py --only overhead scaling --json results.json
    python benchmarks/run.py --accelerator gpu --precision bf16-mixed [--contiguous] [--compile]

Writes the results to ``--json`` (default benchmarks/results/latest.json, or latest-quick.json with --quick)
and a plot of parity and scaling beside it (PNG). Each topic is also a script of its own (overhead.py, with
``--memory`` for memory, scaling.py, quality.py, peers.py) with the same numbers. Peers are skipped when their
library is not installed (``pip install -e ".[bench]"``), quality and peers when Fashion-MNIST is not in
--data-dir.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the helpers beside it

import overhead  # noqa: E402
import peers  # noqa: E402
import plot  # noqa: E402
import quality  # noqa: E402
import scaling  # noqa: E402
from common import FAMILY_NAMES, FASHION_MNIST, RESULTS, add_common_args, apply_common_args, machine, write_json  # noqa: E402

TOPICS = ("overhead", "memory", "scaling", "quality", "peers")

# (quick, full) settings of each topic
# same-net parity at the Fashion-MNIST-sized nets on 28x28 noise images; quick leaves out the bare-Lightning loop
# (a third of the topic's time)
OVERHEAD = {
    "quick": dict(repeats=3, points=[(28, 32)], bare=False),
    "full": dict(repeats=3, points=[(28, 32)], bare=True),
}
MEMORY = dict(size=28, batch_size=128)  # both modes: at batch 32 some families need a few MiB, within the noise
SCALING = {
    "quick": dict(batch_sizes=[32, 128], image_sizes=[28], steps=2),
    "full": dict(batch_sizes=[32, 128, 512], image_sizes=[28, 32, 64], steps=10),  # 1024 and the rest: scaling.py
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short budgets and fewer points (< 10 min on 2 cores)")
    parser.add_argument("--only", nargs="+", choices=TOPICS, default=list(TOPICS))
    parser.add_argument("--data-dir", default=str(FASHION_MNIST), help="Fashion-MNIST's files (quality, peers)")
    parser.add_argument("--accelerator", default="cpu", help="scaling: cpu or gpu")
    parser.add_argument("--precision", default=None, help="scaling: e.g. bf16-mixed (GPU)")
    parser.add_argument("--contiguous", action="store_true", help="scaling: contiguous weights, not channels_last")
    parser.add_argument("--compile", action="store_true", help="scaling: compile the networks")
    parser.add_argument("--no-plot", action="store_true")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    mode = "quick" if args.quick else "full"
    json_path = Path(args.json) if args.json else RESULTS / f"latest{'-quick' if args.quick else ''}.json"

    scaling_options = dict(accelerator=args.accelerator, precision=args.precision, channels_last=not args.contiguous,
                           compile=args.compile)  # fmt: skip
    topics = {
        "overhead": lambda: {
            f"{size}x{size}, batch {batch}": overhead.run(
                list(FAMILY_NAMES), repeats=OVERHEAD[mode]["repeats"], size=size, batch_size=batch,
                bare=OVERHEAD[mode]["bare"],
            )
            for size, batch in OVERHEAD[mode]["points"]
        },
        "memory": lambda: {
            "training_step": overhead.memory(list(FAMILY_NAMES), **MEMORY),
            "iwae_evaluation": overhead.iwae_memory(),
        },
        "scaling": lambda: scaling.run(list(scaling.SCALING_FAMILIES), **SCALING[mode], **scaling_options),
        "quality": lambda: quality.run(args.data_dir, quality.QUICK if args.quick else quality.FULL),
        "peers": lambda: peers.run(args.data_dir, peers.QUICK if args.quick else peers.FULL),
    }  # fmt: skip
    start = time.perf_counter()
    results: dict = {"machine": machine(), "mode": mode, "topic_s": {}}
    if "scaling" in args.only:
        results["scaling_options"] = scaling_options
    for name in (t for t in TOPICS if t in args.only):
        topic_start = time.perf_counter()
        results[name] = topics[name]()
        results["topic_s"][name] = time.perf_counter() - topic_start
    results["wall_s"] = time.perf_counter() - start
    minutes = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in results["topic_s"].items())
    print(f"\n{mode} run: {results['wall_s'] / 60:.1f} min ({minutes}); machine: {results['machine']}")
    write_json(results, json_path)
    print(f"results: {json_path}")
    if not args.no_plot and ("overhead" in results or "scaling" in results):
        print(f"plot: {plot.plot(results, json_path.with_suffix('.png'))}")
    return results


if __name__ == "__main__":
    main()
