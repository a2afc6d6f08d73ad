"""All benchmarks in one run: framework overhead, scaling, quality at a fixed budget, peers; tables, JSON, plot.

    python benchmarks/run.py --quick                  # about 10 minutes on 2 CPU cores
    python benchmarks/run.py                          # longer budgets and every scaling point
    python benchmarks/run.py --only overhead scaling --json results.json
    python benchmarks/run.py --accelerator gpu --precision bf16-mixed --channels-last [--compile]

Writes the results to ``--json`` (default benchmarks/results/latest.json, or latest-quick.json with --quick)
and a plot of overhead and scaling beside it (PNG). Each topic is also a script of its own (overhead.py,
scaling.py, quality.py, peers.py) with the same numbers. Peers are skipped when their library is not installed
(``pip install -e ".[bench]"``), quality and peers when Fashion-MNIST is not in --data-dir.
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

TOPICS = ("overhead", "scaling", "quality", "peers")

# (quick, full) settings of each topic
# same-net parity: (image size, batch size) points; 8: the digits' nets, 28: Fashion-MNIST-sized nets at batch 128
OVERHEAD = {"quick": dict(repeats=3, points=[(8, 64)]), "full": dict(repeats=5, points=[(8, 64), (28, 128)])}
SCALING = {
    "quick": dict(batch_sizes=[32, 128, 512], image_sizes=[28, 32], steps=2),
    "full": dict(batch_sizes=[32, 64, 128, 256, 512, 1024], image_sizes=[28, 32, 64], steps=10),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short budgets and fewer points (< 10 min on 2 cores)")
    parser.add_argument("--only", nargs="+", choices=TOPICS, default=list(TOPICS))
    parser.add_argument("--data-dir", default=str(FASHION_MNIST), help="Fashion-MNIST's files (quality, peers)")
    parser.add_argument("--accelerator", default="cpu", help="scaling: cpu or gpu")
    parser.add_argument("--precision", default=None, help="scaling: e.g. bf16-mixed (GPU)")
    parser.add_argument("--channels-last", action="store_true", help="scaling: channels_last convolutions")
    parser.add_argument("--compile", action="store_true", help="scaling: torch.compile the models")
    parser.add_argument("--no-plot", action="store_true")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    mode = "quick" if args.quick else "full"
    json_path = Path(args.json) if args.json else RESULTS / f"latest{'-quick' if args.quick else ''}.json"

    start = time.perf_counter()
    results: dict = {"machine": machine(), "mode": mode}
    if "overhead" in args.only:
        settings = OVERHEAD[mode]
        results["overhead"] = {
            f"{size}x{size}": overhead.run(list(FAMILY_NAMES), repeats=settings["repeats"], size=size, batch_size=batch)
            for size, batch in settings["points"]
        }
    if "scaling" in args.only:
        options = dict(accelerator=args.accelerator, precision=args.precision, channels_last=args.channels_last,
                       compile=args.compile)  # fmt: skip
        results["scaling_options"] = options
        results["scaling"] = scaling.run(list(scaling.SCALING_FAMILIES), **SCALING[mode], **options)
    budget = quality.QUICK if args.quick else quality.FULL
    if "quality" in args.only:
        results["quality"] = quality.run(args.data_dir, budget)
    if "peers" in args.only:
        results["peers"] = peers.run(args.data_dir, budget)
    results["wall_s"] = time.perf_counter() - start
    print(f"\n{mode} run: {results['wall_s'] / 60:.1f} min; machine: {results['machine']}")
    write_json(results, json_path)
    print(f"results: {json_path}")
    if not args.no_plot and ("overhead" in results or "scaling" in results):
        print(f"plot: {plot.plot(results, json_path.with_suffix('.png'))}")
    return results


if __name__ == "__main__":
    main()
