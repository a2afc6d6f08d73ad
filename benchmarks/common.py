"""What the benchmark scripts share: the model families, the two training loops that are compared, timing
and memory probes, the machine's description and JSON output.

Speed numbers come from at least ``MIN_TIMED_STEPS`` timed steps per measurement, repeated in interleaved rounds,
and the scripts report ratios of numbers measured side by side in one process (absolute times on a shared machine
vary from minute to minute, ratios less) as a ``Spread``: min / median / max over the repeats. A ratio whose repeats
disagree by more than ``SPREAD_TOLERANCE`` gets no verdict (``verdict``).
"""

from __future__ import annotations

import datetime
import gc
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from datamodules import DigitsDataModule, SequentialImageDataModule
from datamodules.base import DataSpec
from dgm_lightning import AE, GAN, VAE, Classifier, Flow, FlowVAE, RecurrentVAE
from dgm_lightning.optimizers import DiscriminatorAdam, GeneratorAdam

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).resolve().parent / "results"
FAMILY_NAMES = ("AE", "VAE", "GAN", "Flow", "FlowVAE", "RecurrentVAE", "Classifier")
MIN_TIMED_STEPS = 100  # per measurement: fewer made the peers' verdicts flip between runs (10-step epochs)
SPREAD_TOLERANCE = 0.10  # repeats of a ratio further apart than this (max / min - 1) give no verdict

# the benchmarks train many short runs; Lightning's hints about logging intervals and workers are noise here
warnings.filterwarnings("ignore", ".*(log_every_n_steps|does not have many workers|LeafSpec|litlogger).*")


# -- families ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One model family: how to build its model for an image size, and its training step written by hand.

    ``loss(model, batch)`` is what a user would write without Lightning for a one-optimizer model: the
    model's own loss functions and nothing else (no logging, no divergence checks). Two-optimizer models
    (the GAN) give ``two_optimizer_step(model, optimizers, batch)`` instead.
    """

    name: str
    build: Callable[[tuple[int, int, int]], L.LightningModule]
    loss: Callable[[L.LightningModule, Any], torch.Tensor] | None = None
    two_optimizer_step: Callable[[L.LightningModule, Sequence[Any], Any], None] | None = None
    value_range: tuple[float, float] = (0.0, 1.0)
    sequences: bool = False  # images read row by row: (B, H, W) sequences with their lengths

    def step(self, model: L.LightningModule, optimizers: Sequence[Any], batch: Any) -> None:
        """One training step of the hand-written loop."""
        if self.loss is None:
            self.two_optimizer_step(model, optimizers, batch)
        else:
            _backward_step(optimizers[0], self.loss(model, batch))


def _small(shape: tuple[int, int, int]) -> bool:
    return shape[1] <= 16  # the 8x8 digits get the digits configs' MLPs; larger images convolutions


def _build_ae(cls: type) -> Callable[[tuple[int, int, int]], L.LightningModule]:
    def build(shape: tuple[int, int, int]) -> L.LightningModule:
        if _small(shape):
            return cls(latent_dim=8, data_shape=shape, architecture="mlp", hidden_dims=[256, 128])
        return cls(latent_dim=32, data_shape=shape, architecture="conv", hidden_dims=[32, 64, 128])

    return build


def _build_flow_vae(shape: tuple[int, int, int]) -> L.LightningModule:
    latent_dim = 8 if _small(shape) else 32
    return FlowVAE(latent_dim, num_flows=8, data_shape=shape, architecture="mlp", hidden_dims=[256, 128])


def _build_gan(shape: tuple[int, int, int]) -> L.LightningModule:
    small = _small(shape)
    return GAN(
        32 if small else 100, data_shape=shape, architecture="dcgan", hidden_dims=[32, 64] if small else [64, 128],
        optimizer_g=partial(GeneratorAdam, lr=2e-4), optimizer_d=partial(DiscriminatorAdam, lr=2e-4), ema_decay=0.999,
    )  # fmt: skip


def _build_flow(shape: tuple[int, int, int]) -> L.LightningModule:
    levels = 17 if _small(shape) else 256  # the digits take 17 grey levels
    return Flow("glow", data_shape=shape, num_scales=2, num_steps=4, hidden_dims=(64, 64), quantization_levels=levels)


def _build_rvae(shape: tuple[int, int, int]) -> L.LightningModule:
    hidden = 128 if _small(shape) else 256
    return RecurrentVAE(8, input_dim=shape[2], likelihood="bernoulli", hidden_dims=[hidden], word_dropout=0.25)


def _build_classifier(shape: tuple[int, int, int]) -> L.LightningModule:
    if _small(shape):
        return Classifier(10, data_shape=shape, feature_dim=64, hidden_dims=(32, 64))
    return Classifier(10, data_shape=shape, feature_dim=128, hidden_dims=(32, 64, 128))


def objective_loss(model: L.LightningModule, batch: Any) -> torch.Tensor:
    """The loss of a one-optimizer family, reached as every family's is: ``model.objective(batch).loss`` (in
    training mode it checks the values of the first batch only, as the Trainer's loop does)."""
    return model.objective(batch).loss


def _backward_step(optimizer: Any, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _gan_step(model, optimizers, batch) -> None:
    # what GAN.training_step does per batch: n_critic discriminator steps, one generator step, the EMA update
    opt_g, opt_d = optimizers
    for _ in range(model.n_critic):
        _backward_step(opt_d, model.discriminator_objective(batch).loss)
    _backward_step(opt_g, model.generator_objective(batch).loss)
    if model.ema is not None:
        model.ema.update_parameters(model.generator)


FAMILIES = {
    "AE": Family("AE", _build_ae(AE), loss=objective_loss),
    "VAE": Family("VAE", _build_ae(VAE), loss=objective_loss),
    "GAN": Family("GAN", _build_gan, two_optimizer_step=_gan_step, value_range=(-1.0, 1.0)),
    "Flow": Family("Flow", _build_flow, loss=objective_loss),
    "FlowVAE": Family("FlowVAE", _build_flow_vae, loss=objective_loss),
    "RecurrentVAE": Family("RecurrentVAE", _build_rvae, loss=objective_loss, sequences=True),
    "Classifier": Family("Classifier", _build_classifier, loss=objective_loss),
}


class BareModule(L.LightningModule):
    """The family's networks, losses and optimizers in the thinnest LightningModule: ``training_step`` returns
    the hand loop's loss (or, for two optimizers, runs its step with the Trainer's optimizers), logging and
    checking nothing. In the Trainer it measures Lightning's own cost, apart from what our modules add."""

    def __init__(self, family: Family, model: L.LightningModule) -> None:
        super().__init__()
        self.family, self.model = family, model
        self.automatic_optimization = family.loss is not None

    def configure_model(self) -> None:
        training_layout(self.model)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.automatic_optimization:
            return self.family.loss(self.model, batch)
        self.family.two_optimizer_step(self.model, self.optimizers(), batch)
        return None

    def configure_optimizers(self) -> Any:
        return self.model.configure_optimizers()


def training_layout(model: L.LightningModule) -> L.LightningModule:
    """The model in the memory format the Trainer gives ours (``channels_last``, see GenerativeModel), so that the
    loops compared run the same kernels and their ratio measures the loop alone."""
    if getattr(model, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    return model


def optimizers_of(model: L.LightningModule) -> list[torch.optim.Optimizer]:
    """The model's optimizers, as its ``configure_optimizers`` makes them (one config, or a list of them)."""
    configured = model.configure_optimizers()
    if isinstance(configured, dict):  # one optimizer (dgm_lightning.optimizers.optimizer_config)
        return [configured["optimizer"]]
    return [c["optimizer"] if isinstance(c, dict) else c for c in configured]


# -- data --------------------------------------------------------------------------------------


def digits_data(family: Family, batch_size: int) -> L.LightningDataModule:
    """The 8x8 digits (installed with scikit-learn), as the family's DataModule expects them."""
    if family.sequences:
        data = SequentialImageDataModule("digits", batch_size=batch_size)
    else:
        data = DigitsDataModule(batch_size=batch_size, value_range=family.value_range)
    data.setup("fit")
    return data


class SyntheticImages(L.LightningDataModule):
    """Uniform noise images of any size (or their rows as sequences): for speed and memory, not for quality."""

    def __init__(self, family: Family, shape: tuple[int, int, int], batch_size: int, num_batches: int) -> None:
        super().__init__()
        self.family, self.shape, self.batch_size = family, shape, batch_size
        low, high = family.value_range
        generator = torch.Generator().manual_seed(0)
        images = low + (high - low) * torch.rand(batch_size * num_batches, *shape, generator=generator)
        labels = torch.randint(0, 10, (images.shape[0],), generator=generator)
        if family.sequences:  # (N, 1, H, W) -> (N, H, W): rows are the steps, all of full length
            self.dataset = TensorDataset(images[:, 0], torch.full((images.shape[0],), shape[1]))
        else:
            self.dataset = TensorDataset(images, labels)

    @property
    def data_spec(self) -> DataSpec:
        c, h, w = self.shape
        if self.family.sequences:
            return DataSpec((h, w), self.family.value_range, None)
        return DataSpec(self.shape, self.family.value_range, 10)

    def train_dataloader(self) -> DataLoader:
        # batches are cut from one tensor, so the step (not per-example indexing) is what is timed
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)


# -- the two loops -----------------------------------------------------------------------------


class EpochTimer(Callback):
    """Wall time of each training epoch, from one epoch's start to the next (or to the end of training),
    so that everything the Trainer does per epoch (epoch-end logging, loader reset) is counted."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end = time.perf_counter()

    @property
    def epoch_times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, [*self.starts[1:], self.end], strict=True)]


class StepTimer(Callback):
    """Wall time of each training step (``training_step`` through the optimizer step), without data loading."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def make_trainer(
    *,
    max_epochs: int = 1,
    limit_train_batches: int | float = 1.0,
    callbacks: Sequence[Callback] = (),
    logger: bool | L.pytorch.loggers.Logger = False,
    accelerator: str = "cpu",
    devices: int = 1,
    precision: str | None = None,
    **kwargs: Any,
) -> L.Trainer:
    """A Trainer as a training run uses it, minus what is not being measured: no validation, checkpoints,
    progress bar or model summary."""
    return L.Trainer(
        max_epochs=max_epochs, limit_train_batches=limit_train_batches, limit_val_batches=0,
        num_sanity_val_steps=0, accelerator=accelerator, devices=devices, precision=precision, logger=logger,
        callbacks=list(callbacks), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )  # fmt: skip


def csv_logger() -> L.pytorch.loggers.CSVLogger:
    """The logger of the timed Trainer runs: logging stays on, as in a real run, written to a local file."""
    return L.pytorch.loggers.CSVLogger("runs/benchmarks", name="speed")


def trainer_epoch_times(model: L.LightningModule, data, epochs: int, batches: int) -> list[float]:
    """Seconds per epoch of ``batches`` steps when the Trainer fits the model (logging to CSV as in real runs;
    ``BareModule`` does not log)."""
    timer = EpochTimer()
    trainer = make_trainer(max_epochs=epochs, limit_train_batches=batches, callbacks=[timer], logger=csv_logger())
    trainer.fit(model, datamodule=data)
    return timer.epoch_times


def hand_epoch_times(family: Family, model: L.LightningModule, data, epochs: int, batches: int) -> list[float]:
    """Seconds per epoch of the same steps in a minimal hand-written loop over the same DataLoader (the weights in
    the memory format ours trains in)."""
    optimizers = optimizers_of(training_layout(model))
    model.train()
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for i, batch in enumerate(data.train_dataloader()):
            if i == batches:
                break
            family.step(model, optimizers, batch)
        times.append(time.perf_counter() - start)
    return times


def steady_seconds(epoch_times: Sequence[float]) -> float:
    """The steady-state time of an epoch: the median, the first epoch (warm-up, allocations) left out."""
    return statistics.median(epoch_times[1:] if len(epoch_times) > 1 else epoch_times)


def epochs_for(batches_per_epoch: int, timed_steps: int = MIN_TIMED_STEPS) -> int:
    """Epochs of a timed run: one warm-up epoch (not timed), then enough for ``timed_steps`` timed steps."""
    return 1 + -(-timed_steps // batches_per_epoch)


def seconds_per_step(epoch_times: Sequence[float], batches_per_epoch: int) -> float:
    """Mean seconds per step over the timed epochs (all but the first): every timed step counts once."""
    timed = epoch_times[1:] if len(epoch_times) > 1 else epoch_times
    return sum(timed) / (len(timed) * batches_per_epoch)


def interleaved(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each run's value in each of ``repeats`` rounds that take the runs in turn (the order alternating), so that a
    busy moment of the machine falls on all of them alike; round r of one run pairs with round r of another."""
    values: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            values[name].append(runs[name]())
    return values


@dataclass(frozen=True)
class Spread:
    """One quantity over interleaved repeats: min / median / max, so that a reader sees how far they agree."""

    values: tuple[float, ...]

    @classmethod
    def of_ratios(cls, numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
        """The ratios of paired repeats (round r over round r)."""
        return cls(tuple(a / b for a, b in zip(numerators, denominators, strict=True)))

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    @property
    def settled(self) -> bool:
        """Whether the repeats agree within ``SPREAD_TOLERANCE`` (max / min - 1)."""
        return len(self.values) > 1 and self.max <= self.min * (1 + SPREAD_TOLERANCE)

    def __str__(self) -> str:
        return f"{self.median:.3g} ({self.min:.3g}-{self.max:.3g})"

    def as_dict(self) -> dict[str, Any]:
        return {"min": self.min, "median": self.median, "max": self.max, "values": list(self.values)}


def verdict(ratio: Spread, target: float) -> str:
    """Whether a ratio (higher is better) meets its target, or that its repeats disagree too much to say."""
    if not ratio.settled:
        spread = "one repeat" if len(ratio.values) < 2 else f"repeats {ratio.max / ratio.min - 1:.0%} apart"
        return f"unsettled ({spread})"
    return f"meets >= {target:g}" if ratio.median >= target else f"below {target:g}"


# -- memory ------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of a block of code, in MiB: on a GPU the CUDA allocator's peak; on the CPU the process's peak
    resident set (VmHWM, reset before the block by writing to /proc/self/clear_refs) minus its resident set at
    the start, after freed heap memory was handed back to the system (malloc_trim), so that it counts what the
    block itself needed. torch's CPU tensors are invisible to tracemalloc, so RSS is the honest CPU measure.
    NaN where the system offers neither (not Linux).
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.peak_mib = float("nan")
        self._start: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        _trim_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._start = _proc_status_kib("VmRSS") * 1024
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else _proc_status_kib("VmHWM") * 1024
        self.peak_mib = (peak - self._start) / 2**20


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _trim_heap() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline keeps freed memory, the peak is then a bit low
        pass


# -- command line ------------------------------------------------------------------------------


def add_common_args(parser) -> None:
    """Options every benchmark script takes."""
    # One thread by default: the numbers compared are ratios, and on a machine shared with other busy processes
    # (CI, a developer's tests) two OpenMP threads per process wait on each other and slow small steps 10-100
    # times at random moments, which made the ratios meaningless in a measured run; one thread keeps them stable.
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: stable ratios on a shared machine; 0: torch's choice, one per core)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the results to this file")


def apply_common_args(args) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)


# -- reporting ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": torch.multiprocessing.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        model = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
        info["cpu"] = model.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    return info


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table; floats with 3 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return path


def seeded(build: Callable[[], L.LightningModule], seed: int = 0) -> L.LightningModule:
    """A model built after seeding, so that every loop starts from the same weights."""
    L.seed_everything(seed, verbose=False)
    return build()
