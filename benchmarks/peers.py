"""Peers: time per step of our models (defaults) against other libraries' on equal networks and the same data, and
the quality each reaches with the same training.

    python benchmarks/peers.py [--quick] [--data-dir /usr/share/datasets/fashion-mnist] [--json PATH]

- VAE: pythae's VAE and BaseTrainer (``pip install pythae``) with our VAE's encoder and decoder networks (same
  initial weights; pythae's decoder ends in a sigmoid, as its BCE loss takes probabilities).
- Flow: a normflows Glow (``pip install normflows``) of the same shape as ours (2 scales x 4 steps, 64 hidden
  channels) in a plain training loop, as normflows' examples train it; the layers are normflows' own.
- GAN: a plain DCGAN loop (BCE on logits, Adam, no EMA), as in the PyTorch tutorial, with our nets.

Ours and the peer each train a fresh model (same initial weights) for a warm-up epoch and then at least 100 timed
steps, in ``repeats`` interleaved rounds; peer/ours is the ratio of their mean times per timed step in paired
rounds, median (min-max), > 1 when ours is faster (target 1.2; repeats more than 10 % apart give no verdict). The
quality columns are those of the last round's models, tested on the same test images in float32. Ours trains in its
default precision on this machine (``dgm_lightning.precision.default_precision``: bf16-mixed for convolutions on a
CPU with AMX), the peers in theirs (float32). A peer that is not installed is reported as such and skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the helpers beside it

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    FASHION_MNIST,
    EpochTimer,
    Spread,
    add_common_args,
    apply_common_args,
    epochs_for,
    interleaved,
    machine,
    make_trainer,
    print_table,
    seconds_per_step,
    seeded,
    verdict,
    write_json,
)
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from callbacks import GenerativeMetrics  # noqa: E402
from datamodules import FashionMNISTDataModule  # noqa: E402
from dgm_lightning import GAN, VAE, Classifier, Flow  # noqa: E402
from dgm_lightning.optimizers import DiscriminatorAdam, GeneratorAdam  # noqa: E402
from dgm_lightning.precision import default_precision  # noqa: E402

TARGET = 1.2  # peer time / our time


@dataclass(frozen=True)
class Setup:
    """Each timed run: epochs of ``batches`` batches of ``batch_size`` (a warm-up epoch, then >= 100 timed steps),
    ``repeats`` interleaved rounds; the last round's models tested on ``test_images`` images, the VAEs' NLL with
    ``iwae_samples`` importance samples."""

    batch_size: int
    batches: int
    test_images: int
    iwae_samples: int
    repeats: int = 3
    eval_batch_size: int = 500

    @property
    def epochs(self) -> int:
        return epochs_for(self.batches)

    def describe(self) -> str:
        return (
            f"{self.repeats} interleaved rounds of {self.epochs} epochs x {self.batches} batches of "
            f"{self.batch_size} Fashion-MNIST images (the first epoch not timed), "
            f"test on {self.test_images:,} test images"
        )


# epochs of 25 batches: a warm-up epoch and 100 timed steps (5 epochs), the least a measurement may have
QUICK = Setup(batch_size=32, batches=25, test_images=1000, iwae_samples=50)  # the quick parity's batch
FULL = Setup(batch_size=128, batches=25, test_images=2000, iwae_samples=100)


class TensorData(L.LightningDataModule):
    """Fixed training and test tensors, so that ours and the peer see the same images; each epoch in a random
    order, as training runs (and pythae's trainer) take them."""

    def __init__(self, train: torch.Tensor, test: torch.Tensor, setup: Setup) -> None:
        super().__init__()
        self.train, self.test, self.settings = train, test, setup

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.train), batch_size=self.settings.batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.test), batch_size=self.settings.eval_batch_size)


def load_images(data_dir: str | Path, setup: Setup) -> TensorData:
    """One epoch's training images and the test images, in [0, 1]."""
    data = FashionMNISTDataModule(str(data_dir), batch_size=setup.batch_size)
    data.setup("fit")
    train = data.splits["train"].tensors[0][: setup.batches * setup.batch_size]
    data.setup("test")
    return TensorData(train, data.splits["test"].tensors[0][: setup.test_images], setup)


def ours(build: Callable[[], L.LightningModule], data: TensorData, trained: dict) -> Callable[[], float]:
    """A timed run of a fresh model of ours in the Trainer, in its default precision on this machine (logging to no
    logger: the peers log nothing); seconds per timed step. The model is kept in ``trained["ours"]``, its precision
    in ``trained["precision"]``."""

    def run() -> float:
        model, timer = seeded(build), EpochTimer()
        trained["precision"] = default_precision(model)
        trainer = make_trainer(max_epochs=data.settings.epochs, callbacks=[timer], precision=trained["precision"])
        trainer.fit(model, datamodule=data)
        trained["ours"] = model
        return seconds_per_step(timer.epoch_times, data.settings.batches)

    return run


def hand_loop(build: Callable[[], Any], step: Callable[[Any, torch.Tensor], None], data: TensorData, trained: dict):
    """A timed run of a peer's plain loop: ``step(state, x)`` per batch on the state ``build()`` makes; seconds per
    timed step. The state is kept in ``trained["peer"]``."""

    def run() -> float:
        state, times = build(), []
        for _ in range(data.settings.epochs):
            start = time.perf_counter()
            for (x,) in data.train_dataloader():
                step(state, x)
            times.append(time.perf_counter() - start)
        trained["peer"] = state
        return seconds_per_step(times, data.settings.batches)

    return run


def compare(runs: dict[str, Callable[[], float]], repeats: int, trained: dict) -> dict[str, Any]:
    """Interleaved timed runs of ours and the peer; their times and the peer/ours ratio with its verdict."""
    seconds = interleaved(runs, repeats)
    ratio = Spread.of_ratios(seconds["peer"], seconds["ours"])
    return {
        "ours_precision": trained["precision"],
        "ours_ms_per_step": Spread(tuple(1e3 * t for t in seconds["ours"])).as_dict(),
        "peer_ms_per_step": Spread(tuple(1e3 * t for t in seconds["peer"])).as_dict(),
        "peer_over_ours_time": ratio.as_dict(),
        "verdict": verdict(ratio, TARGET),
    }


def test_metrics(model: L.LightningModule, data: TensorData, callbacks=()) -> dict[str, float]:
    """Test metrics in float32, for ours and the peers alike."""
    (metrics,) = make_trainer(callbacks=list(callbacks)).test(model, datamodule=data, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


# -- VAE: pythae --------------------------------------------------------------------------------


def vae_vs_pythae(data: TensorData) -> dict:
    setup = data.settings

    def build() -> VAE:
        return VAE(32, architecture="conv", hidden_dims=[32, 64, 128], iwae_samples=setup.iwae_samples)

    if importlib.util.find_spec("pythae") is None:
        return {"peer": "pythae not installed"}
    trained: dict = {}
    runs = {"ours": ours(build, data, trained), "peer": pythae_run(build, data, trained)}
    result = compare(runs, setup.repeats, trained)
    metrics = test_metrics(trained["ours"], data)
    peer = trained["peer"].eval()
    with torch.no_grad():
        elbo = -torch.cat([peer({"data": x}).loss[None] * len(x) for (x,) in data.test_dataloader()]).sum()
        # pythae returns the mean IWAE estimate of log p(x), one test image at a time
        nll = -float(peer.get_nll(data.test, n_samples=setup.iwae_samples, batch_size=setup.iwae_samples))
    quality = {"test ELBO, nats": (metrics["test/elbo"], float(elbo) / len(data.test)),
               "test IWAE NLL, nats": (metrics["test/nll"], nll)}  # fmt: skip
    return {**result, "peer": "pythae", "quality": quality}


def pythae_run(build: Callable[[], VAE], data: TensorData, trained: dict) -> Callable[[], float]:
    """pythae's VAE and BaseTrainer around our VAE's networks (the same initial weights as ours)."""
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE as PythaeVAE
    from pythae.models import VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    class Encoder(BaseEncoder):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            loc, log_var = self.net(x).chunk(2, dim=1)
            return ModelOutput(embedding=loc, log_covariance=log_var)

    class Decoder(BaseDecoder):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    class Timer(TrainingCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_epoch_begin(self, training_config, **kwargs) -> None:
            self.starts.append(time.perf_counter())

        def on_train_end(self, training_config, **kwargs) -> None:
            self.end = time.perf_counter()

    def run() -> float:
        nets, timer, setup = seeded(build), Timer(), data.settings
        config = VAEConfig(input_dim=(1, 28, 28), latent_dim=32, reconstruction_loss="bce")
        peer = PythaeVAE(config, Encoder(nets.encoder), Decoder(nets.decoder))
        with tempfile.TemporaryDirectory() as output_dir:
            config = BaseTrainerConfig(
                output_dir=output_dir, num_epochs=setup.epochs, per_device_train_batch_size=setup.batch_size,
                learning_rate=1e-3, optimizer_cls="Adam", no_cuda=True, steps_saving=None,
            )  # fmt: skip
            BaseTrainer(peer, BaseDataset(data.train, torch.zeros(len(data.train))), None, config, [timer]).train()
        trained["peer"] = peer
        epochs = [b - a for a, b in zip(timer.starts, [*timer.starts[1:], timer.end], strict=True)]
        return seconds_per_step(epochs, setup.batches)

    return run


# -- Flow: normflows ----------------------------------------------------------------------------


def normflows_glow(shape=(1, 28, 28), scales: int = 2, steps: int = 4, hidden: int = 64):
    """Glow as normflows' README builds it (multi-scale, channel split, affine couplings)."""
    import normflows as nf

    channels = shape[0]
    q0, merges, flows = [], [], []
    for i in range(scales):
        flows.append(
            [nf.flows.GlowBlock(channels * 2 ** (scales + 1 - i), hidden, split_mode="channel") for _ in range(steps)]
            + [nf.flows.Squeeze()]
        )
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (channels * 2 ** (scales - i), shape[1] // 2 ** (scales - i), shape[2] // 2 ** (scales - i))
        else:
            latent = (channels * 2 ** (scales + 1), shape[1] // 2**scales, shape[2] // 2**scales)
        q0.append(nf.distributions.DiagGaussian(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def dequantize(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (k / 255) -> (k + u) / 256 in [0, 1), the normflows examples' dequantization."""
    return (x * 255 + torch.rand_like(x)) / 256


def flow_vs_normflows(data: TensorData) -> dict:
    def build() -> Flow:
        return Flow("glow", num_scales=2, num_steps=4, hidden_dims=(64, 64), quantization_levels=256)

    if importlib.util.find_spec("normflows") is None:
        return {"peer": "normflows not installed"}

    def peer_build():
        peer = seeded(normflows_glow)
        return peer, torch.optim.Adam(peer.parameters(), lr=1e-3)

    def peer_step(state, x: torch.Tensor) -> None:
        peer, optimizer = state
        optimizer.zero_grad(set_to_none=True)
        peer.forward_kld(dequantize(x)).backward()
        optimizer.step()

    trained: dict = {}
    runs = {"ours": ours(build, data, trained), "peer": hand_loop(peer_build, peer_step, data, trained)}
    result = compare(runs, data.settings.repeats, trained)
    peer = trained["peer"][0].eval()
    with torch.no_grad():
        nll = torch.cat([-peer.log_prob(dequantize(x), None) for (x,) in data.test_dataloader()]).mean()
    bpd = float(nll) / (math.prod(data.test.shape[1:]) * math.log(2)) + 8  # density of (k + u) / 256 -> 8-bit k
    quality = {"test bits/dim": (test_metrics(trained["ours"], data)["test/bpd"], bpd)}
    return {**result, "peer": "normflows", "quality": quality}


# -- GAN: a plain DCGAN loop ---------------------------------------------------------------------


def gan_vs_plain_dcgan(data: TensorData, classifier_checkpoint: Path) -> dict:
    def build(**overrides) -> GAN:
        return GAN(
            100, architecture="dcgan", hidden_dims=[64, 128], value_range=(0.0, 1.0),
            optimizer_g=partial(GeneratorAdam, lr=2e-4), optimizer_d=partial(DiscriminatorAdam, lr=2e-4), **overrides,
        )  # fmt: skip

    def peer_build():
        # our networks (same initial weights), held by a GAN without an average so that it tests the trained one
        nets = seeded(partial(build, ema_decay=None))
        adam = partial(torch.optim.Adam, lr=2e-4, betas=(0.5, 0.999))
        return nets, adam(nets.generator.parameters()), adam(nets.discriminator.parameters())

    def peer_step(state, x: torch.Tensor) -> None:
        nets, opt_g, opt_d = state
        generator, discriminator = nets.generator, nets.discriminator
        fake = generator(torch.randn(len(x), 100))
        real_logits, fake_logits = discriminator(x).view(-1), discriminator(fake.detach()).view(-1)
        d_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        d_loss = d_loss + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_logits = discriminator(fake).view(-1)
        g_loss = F.binary_cross_entropy_with_logits(g_logits, torch.ones_like(g_logits))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()

    trained: dict = {}
    runs = {"ours": ours(build, data, trained), "peer": hand_loop(peer_build, peer_step, data, trained)}
    result = compare(runs, data.settings.repeats, trained)

    def fid_kid(model: GAN) -> tuple[float, float]:
        callback = GenerativeMetrics(
            metrics=("fid", "kid"), classifier_checkpoint=str(classifier_checkpoint),
            num_samples=len(data.test), kid_subset_size=min(100, len(data.test)),
        )  # fmt: skip
        L.seed_everything(0, verbose=False)
        metrics = test_metrics(model, data, [callback])
        return metrics["test/fid"], metrics["test/kid"]

    (ours_fid, ours_kid), (peer_fid, peer_kid) = fid_kid(trained["ours"]), fid_kid(trained["peer"][0])
    quality = {"FID (classifier features)": (ours_fid, peer_fid), "KID (classifier features)": (ours_kid, peer_kid)}
    return {**result, "peer": "plain DCGAN loop", "quality": quality}


def train_classifier(data_dir: str | Path, data: TensorData, checkpoint: Path) -> float:
    """The FID/KID features: a classifier trained as long as the GANs (on the labelled images); its test accuracy."""
    module = FashionMNISTDataModule(
        str(data_dir), batch_size=data.settings.batch_size, eval_batch_size=data.settings.eval_batch_size
    )
    classifier = seeded(lambda: Classifier(10, feature_dim=128, hidden_dims=(32, 64, 128)))
    trainer = make_trainer(max_epochs=data.settings.epochs, limit_train_batches=data.settings.batches)
    trainer.fit(classifier, datamodule=module)
    trainer.save_checkpoint(checkpoint)
    limit = data.settings.test_images // data.settings.eval_batch_size
    (metrics,) = make_trainer(limit_test_batches=limit).test(classifier, datamodule=module, verbose=False)
    return float(metrics["test/accuracy"])


def run(data_dir: str | Path, setup: Setup) -> dict:
    if not Path(data_dir).is_dir():
        print(f"\nPeers: skipped, no Fashion-MNIST in {data_dir}")
        return {"skipped": f"no Fashion-MNIST in {data_dir}"}
    data = load_images(data_dir, setup)
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint = Path(workdir) / "classifier.ckpt"
        accuracy = train_classifier(data_dir, data, checkpoint)
        results = {
            "setup": setup.describe(),
            "classifier_test_accuracy": accuracy,
            "VAE": vae_vs_pythae(data),
            "Flow": flow_vs_normflows(data),
            "GAN": gan_vs_plain_dcgan(data, checkpoint),
        }
    rows = []
    for family in ("VAE", "Flow", "GAN"):
        r = results[family]
        if "verdict" not in r:
            rows.append([family, r["peer"], "-", "-", "-", "-", "-", "-", "-", "-"])
            continue
        speed = [r["ours_precision"], spread_text(r["ours_ms_per_step"]), spread_text(r["peer_ms_per_step"]),
                 spread_text(r["peer_over_ours_time"]), r["verdict"]]  # fmt: skip
        for i, (metric, (ours_value, peer_value)) in enumerate(r["quality"].items()):
            rows.append([family, r["peer"], *(speed if i == 0 else [""] * 5), metric, ours_value, peer_value])
    print_table(
        f"Peers: {results['setup']}; ours in its default precision here, the peers in float32; ms per timed step "
        f"and peer/ours time, median (min-max) over the rounds; "
        f"> 1: ours faster, target >= {TARGET}; quality of the last round's models (ELBO: higher is better; "
        f"the others lower; FID/KID features: a classifier of test accuracy {accuracy:.3f})",
        ["family", "peer", "ours in", "ours ms", "peer ms", "peer/ours", "verdict", "metric", "ours", "peer"],
        rows,
    )
    return results


def spread_text(spread: dict[str, Any]) -> str:
    return str(Spread(tuple(spread["values"])))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.describe()} (default: {FULL.describe()})")
    parser.add_argument("--data-dir", default=str(FASHION_MNIST))
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    results = {"machine": machine(), "peers": run(args.data_dir, QUICK if args.quick else FULL)}
    if args.json:
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
