"""Plot benchmark results (a JSON file written by run.py) as a PNG, with Pillow (no plotting library needed).

    python benchmarks/plot.py benchmarks/results/latest-quick.json [out.png]

Left: framework overhead, Trainer/hand-loop steps/s per family (ours and a bare LightningModule), with the
0.95 target. Right: scaling, the time per example at each batch size relative to the smallest batch (at or
below 1: cost grows no worse than linearly with the batch).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, PANEL = 1200, 520, 560
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
GREY, BLACK = "#999999", "#000000"


def _frame(draw: ImageDraw.ImageDraw, x0: int, y0: int, w: int, h: int, title: str, lo: float, hi: float) -> None:
    """Axes box with a title and five y ticks between lo and hi."""
    draw.rectangle([x0, y0, x0 + w, y0 + h], outline=BLACK)
    draw.text((x0, y0 - 34), title, fill=BLACK)
    for i in range(5):
        value = lo + (hi - lo) * i / 4
        y = y0 + h - h * i / 4
        draw.line([x0 - 4, y, x0, y], fill=BLACK)
        draw.text((x0 - 40, y - 6), f"{value:.2f}", fill=BLACK)


def _hline(draw, x0, w, y, label: str) -> None:
    for x in range(x0, x0 + w, 8):  # dashed
        draw.line([x, y, min(x + 4, x0 + w), y], fill=GREY)
    draw.text((x0 + w - 60, y - 14), label, fill=GREY)


def overhead_panel(draw: ImageDraw.ImageDraw, overhead: dict, x0: int, y0: int, w: int, h: int) -> None:
    name, rows = next(iter(overhead.items()))  # the first point measured
    # the quick run has no bare-Lightning loop: its bars are left out
    ratios = [(family, r["ratio"]["median"], r.get("bare_lightning_ratio", {}).get("median", 0.0))
              for family, r in rows.items()]  # fmt: skip
    hi = max(1.1, *(max(a, b) for _, a, b in ratios)) * 1.05
    _frame(draw, x0, y0, w, h, f"Parity ({name}): Trainer / hand-loop steps/s (blue ours, orange bare)", 0, hi)
    y_of = lambda v: y0 + h - h * v / hi  # noqa: E731
    _hline(draw, x0, w, y_of(0.97), "target 0.97")
    _hline(draw, x0, w, y_of(1.0), "1.0")
    slot = w / len(ratios)
    for i, (family, ours, bare) in enumerate(ratios):
        left = x0 + i * slot + slot * 0.15
        bar = slot * 0.33
        draw.rectangle([left, y_of(ours), left + bar, y_of(0)], fill=COLORS[0])
        draw.rectangle([left + bar, y_of(bare), left + 2 * bar, y_of(0)], fill=COLORS[1])
        draw.text((left, y_of(ours) - 14), f"{ours:.2f}", fill=BLACK)
        draw.text((x0 + i * slot + 4, y0 + h + 6 + 12 * (i % 2)), family, fill=BLACK)


def scaling_panel(draw: ImageDraw.ImageDraw, scaling: dict, x0: int, y0: int, w: int, h: int) -> None:
    series = {}
    for family, r in scaling.items():
        points = r["by_batch_size"]
        base = points[0]["ms_per_example"]
        series[family] = [(p["batch_size"], p["ms_per_example"] / base) for p in points]
    batches = sorted({b for pts in series.values() for b, _ in pts})
    hi = max(1.2, *(v for pts in series.values() for _, v in pts)) * 1.05
    _frame(draw, x0, y0, w, h, "Scaling: time per example vs batch size, relative to the smallest batch", 0, hi)
    _hline(draw, x0, w, y0 + h - h * 1.0 / hi, "linear")
    lo_b, hi_b = math.log2(batches[0]), math.log2(batches[-1])
    x_of = lambda b: x0 + 20 + (w - 40) * (math.log2(b) - lo_b) / max(hi_b - lo_b, 1)  # noqa: E731
    for b in batches:
        draw.text((x_of(b) - 10, y0 + h + 6), str(b), fill=BLACK)
    for i, (family, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        xy = [(x_of(b), y0 + h - h * v / hi) for b, v in pts]
        draw.line(xy, fill=color, width=3)
        for x, y in xy:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        draw.text((x0 + 10, y0 + 8 + 14 * i), family, fill=color)


def plot(results: dict, path: str | Path) -> Path:
    """Draw what the results hold (overhead, scaling) into a PNG at path."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    m = results["machine"]
    draw.text(
        (20, 10),
        f"dgm-lightning benchmarks, {results.get('mode', '')} run, {m['date']}: {m['cpu_count']} CPU cores "
        f"({m['torch_threads']} torch threads), GPU {m['gpu'] or 'none'}, torch {m['torch']}, "
        f"lightning {m['lightning']}",
        fill=BLACK,
    )
    if "overhead" in results:
        overhead_panel(draw, results["overhead"], 70, 90, PANEL - 100, HEIGHT - 150)
    if "scaling" in results:
        scaling_panel(draw, results["scaling"], PANEL + 90, 90, WIDTH - PANEL - 120, HEIGHT - 150)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def main() -> None:
    source = Path(sys.argv[1])
    print(plot(json.loads(source.read_text()), sys.argv[2] if len(sys.argv) > 2 else source.with_suffix(".png")))


if __name__ == "__main__":
    main()
