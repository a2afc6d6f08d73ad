"""The benchmark scripts run and write the tables they promise (benchmarks/)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import PRINT_IMPORTS, assert_imported_the_tree_under_test, tree_under_test_env

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# runs a script as `python script args` would, then reports where the project's packages came from
WITH_IMPORT_REPORT = f"""
import atexit, runpy, sys
atexit.register(exec, {PRINT_IMPORTS!r}, {{}})
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_script(script: str, *args: str, cwd: Path, timeout: float) -> None:
    """A benchmark script with the tree under test on the path, in cwd (what it writes goes there)."""
    result = subprocess.run(
        [sys.executable, "-c", WITH_IMPORT_REPORT, str(ROOT / "benchmarks" / script), *args],
        cwd=cwd, env=tree_under_test_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert_imported_the_tree_under_test(result.stdout, packages=("dgm_lightning", "datamodules"))


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_overhead(table: dict, families) -> None:
    assert set(table) == set(families)
    for row in table.values():
        assert row["timed_steps"] >= 100, row
        bare = "bare" in row["ms_per_step"]  # the quick run leaves the bare-Lightning loop out
        for loop in ("hand", "bare", "ours") if bare else ("hand", "ours"):
            spread = row["ms_per_step"][loop]
            assert positive(spread["min"]) and spread["min"] <= spread["median"] <= spread["max"], (loop, row)
        for key in ("ratio", "bare_lightning_ratio", "ours_vs_bare_ratio") if bare else ("ratio",):
            assert all(positive(v) for v in row[key]["values"]), (key, row)
        assert row["verdict"].startswith(("meets", "below", "unsettled")), row


def check_memory(table: dict, families) -> None:
    assert set(table) == set(families)
    for row in table.values():
        assert positive(row["hand_mib"]) and positive(row["ours_mib"]), row
        assert row["ratio"] == pytest.approx(row["ours_mib"] / row["hand_mib"]), row


def check_iwae_memory(table: dict) -> None:
    peaks = {int(chunk): row["peak_mib"] for chunk, row in table.items()}
    assert sorted(peaks) == [1, 10, 100] and all(positive(v) for v in peaks.values()), table
    assert peaks[100] > 5 * peaks[1], table  # the flag bounds it: 100 samples decoded at once take far more


def test_overhead_script_writes_its_table(tmp_path):
    out = tmp_path / "overhead.json"
    run_script(
        "overhead.py", "--families", "AE", "--repeats", "2", "--threads", "1", "--memory", "--json", str(out),
        cwd=tmp_path, timeout=180,
    )  # fmt: skip
    results = json.loads(out.read_text())
    check_overhead(results["overhead"], ["AE"])
    check_memory(results["memory"], ["AE"])
    check_iwae_memory(results["iwae_memory"])
    assert results["machine"]["torch"] and results["machine"]["cpu_count"] >= 1
    assert list((tmp_path / "runs" / "benchmarks").glob("speed/*/metrics.csv"))  # its logs: here, not in the repo


def benchmark_common():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    return common


def test_a_ratio_is_reported_with_its_spread_and_a_verdict_only_when_its_repeats_agree():
    common = benchmark_common()
    settled = common.Spread.of_ratios([10.0, 10.2, 9.9], [10.0, 10.0, 10.0])
    assert (settled.min, settled.median, settled.max) == (0.99, 1.0, 1.02) and settled.settled
    assert str(settled) == "1 (0.99-1.02)"
    assert common.verdict(settled, 0.97) == "meets >= 0.97"
    assert common.verdict(common.Spread((0.9, 0.92, 0.91)), 0.97) == "below 0.97"
    scattered = common.Spread((0.94, 1.54, 1.1))  # the peers table's two runs of one ratio, in one
    assert not scattered.settled and common.verdict(scattered, 1.2) == "unsettled (repeats 64% apart)"
    assert common.verdict(common.Spread((1.3,)), 1.2) == "unsettled (one repeat)"


def test_a_timed_run_has_a_warm_up_epoch_and_at_least_the_steps_asked_for():
    common = benchmark_common()
    assert common.epochs_for(20) == 6 and common.epochs_for(100) == 2 and common.epochs_for(30, 100) == 5
    assert common.seconds_per_step([9.0, 2.0, 4.0], 10) == 0.3  # the first (warm-up) epoch left out
    import peers

    for setup in (peers.QUICK, peers.FULL):
        assert (setup.epochs - 1) * setup.batches >= common.MIN_TIMED_STEPS and setup.repeats >= 3, setup


def test_the_hand_loops_train_in_the_memory_format_ours_does():
    common = benchmark_common()
    model = common.training_layout(common.FAMILIES["VAE"].build((1, 28, 28)))
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    model = common.FAMILIES["VAE"].build((1, 28, 28))
    model.channels_last = False
    assert all(p.is_contiguous() for p in common.training_layout(model).parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_the_gpu_script_says_it_needs_a_gpu(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py")], cwd=tmp_path, env=tree_under_test_env(),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "needs a CUDA GPU" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_quick_mode_prints_and_writes_every_table(tmp_path):
    out = tmp_path / "quick.json"
    run_script("run.py", "--quick", "--json", str(out), cwd=tmp_path, timeout=20 * 60)
    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    for table in results["overhead"].values():
        check_overhead(table, ["AE", "VAE", "GAN", "Flow", "FlowVAE", "RecurrentVAE", "Classifier"])
    for family in results["scaling"].values():
        for point in family["by_batch_size"] + family["by_image_size"]:
            assert positive(point["steps_per_s"]) and positive(point["examples_per_s"]), point
            assert math.isfinite(point["peak_memory_mib"]) and point["peak_memory_mib"] >= 0, point
        assert positive(family["per_example_time_ratio"])
    check_memory(
        results["memory"]["training_step"], ["AE", "VAE", "GAN", "Flow", "FlowVAE", "RecurrentVAE", "Classifier"]
    )
    check_iwae_memory(results["memory"]["iwae_evaluation"])
    if FASHION_MNIST.is_dir():
        quality = results["quality"]
        assert math.isfinite(quality["VAE"]["test_elbo_nats"]) and positive(quality["VAE"]["test_iwae_nll_nats"])
        assert positive(quality["Flow"]["test_bits_per_dim"])
        assert positive(quality["GAN"]["fid"]) and math.isfinite(quality["GAN"]["kid"])
        for family in ("VAE", "Flow", "GAN"):
            row = results["peers"][family]
            if "verdict" not in row:
                assert row["peer"].endswith("not installed"), row
                continue
            for key in ("ours_ms_per_step", "peer_ms_per_step", "peer_over_ours_time"):
                assert len(row[key]["values"]) >= 3 and all(positive(v) for v in row[key]["values"]), (key, row)
            assert row["verdict"].startswith(("meets", "below", "unsettled")), row
            for ours, peer in row["quality"].values():
                assert math.isfinite(ours) and math.isfinite(peer), row
    assert out.with_suffix(".png").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
def test_the_strategies_script_writes_one_row_per_option(tmp_path):
    out = tmp_path / "strategies.json"
    run_script("strategies.py", "--quick", "--no-geometry", "--json", str(out), cwd=tmp_path, timeout=10 * 60)
    results = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from strategies import STRATEGIES

    assert list(results["strategies"]) == [name for name, _ in STRATEGIES]
    for row in results["strategies"].values():
        assert positive(row["test_iwae_nll_nats"]) and row["test_elbo_nats"] < 0 < row["s_per_epoch"]
        assert row["test_elbo_nats"] <= -row["test_iwae_nll_nats"] + 1.0  # the ELBO is the looser bound
        assert positive(row["fid"]) and 0 <= row["active_units"] <= 16


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
def test_the_vqvae_script_compares_both_stages_with_the_vae(tmp_path):
    out = tmp_path / "vqvae.json"
    run_script("vqvae.py", "--quick", "--json", str(out), "--png", str(tmp_path / "grid.png"), cwd=tmp_path,
               timeout=10 * 60)  # fmt: skip
    results = json.loads(out.read_text())["vqvae"]
    vae, first, both = results["VAE"], results["VQ-VAE, uniform prior"], results["VQ-VAE + PixelCNN prior"]
    for row in (vae, first, both):
        assert positive(row["squared_error"]) and positive(row["fid"]) and row["elbo"] < 0 < row["train_s"]
    assert 1 <= first["perplexity"] <= 128 and 0 < first["codes_used"] <= 1
    assert both["elbo"] > first["elbo"]  # a learned prior beats the uniform one on the same codes
    assert (tmp_path / "grid.png").is_file()
