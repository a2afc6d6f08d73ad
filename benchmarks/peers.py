"""Peers: time per epoch (and quality at the same budget) of our models against other libraries' on the same data.

    python benchmarks/peers.py [--quick] [--data-dir /usr/share/datasets/fashion-mnist] [--json PATH]

- VAE: pythae's VAE and BaseTrainer (``pip install pythae``) with our VAE's encoder and decoder networks (same
  initial weights; pythae's decoder ends in a sigmoid, as its BCE loss takes probabilities).
- Flow: a normflows Glow (``pip install normflows``) of the same shape as ours (2 scales x 4 steps, 64 hidden
  channels) in a plain training loop, as normflows' examples train it; the layers are normflows' own.
- GAN: a plain DCGAN loop (BCE on logits, Adam, no EMA), as in the PyTorch tutorial, with our nets.

Each trains ``epochs`` epochs on the same Fashion-MNIST images; the time per epoch is the median of epochs
2..N, and ours/peer > 1 means ours is faster. A peer that is not installed is reported as such and skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the helpers beside it

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    FASHION_MNIST,
    EpochTimer,
    add_common_args,
    apply_common_args,
    machine,
    make_trainer,
    print_table,
    seeded,
    steady_seconds,
    write_json,
)
from quality import FULL, QUICK, Budget  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from datamodules import FashionMNISTDataModule  # noqa: E402
from dgm_lightning import GAN, VAE, Flow  # noqa: E402
from dgm_lightning.optimizers import DiscriminatorAdam, GeneratorAdam  # noqa: E402

PEER_EPOCHS = 3  # the budget's batches are spread over this many epochs, so that epochs 2..N give a steady time


class TensorData(L.LightningDataModule):
    """Fixed training and test tensors, so that ours and the peer see exactly the same images in the same order."""

    def __init__(self, train: torch.Tensor, test: torch.Tensor, batch_size: int) -> None:
        super().__init__()
        self.train, self.test, self.batch_size = train, test, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.train), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.test), batch_size=self.batch_size)


def load_images(data_dir: str | Path, budget: Budget) -> tuple[torch.Tensor, torch.Tensor, Budget]:
    """The budget's training images (one epoch of the peers' runs) and test images, in [0, 1]."""
    data = FashionMNISTDataModule(str(data_dir), batch_size=budget.batch_size)
    data.setup("fit")
    train = data.splits["train"].tensors[0]
    total = (budget.train_batches or len(train) // budget.batch_size) * budget.epochs
    per_epoch = max(1, total // PEER_EPOCHS) * budget.batch_size
    test = data.splits["test"].tensors[0][: budget.test_images]
    return train[:per_epoch], test, budget


def ours(model: L.LightningModule, data: TensorData) -> tuple[float, L.Trainer]:
    """Steady time per epoch of our model in the Trainer (logging as in real runs is off: peers log nothing)."""
    timer = EpochTimer()
    trainer = make_trainer(max_epochs=PEER_EPOCHS, callbacks=[timer])
    trainer.fit(model, datamodule=data)
    return steady_seconds(timer.epoch_times), trainer


def timed_epochs(run_epoch, epochs: int = PEER_EPOCHS) -> float:
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        run_epoch()
        times.append(time.perf_counter() - start)
    return steady_seconds(times)


# -- VAE: pythae --------------------------------------------------------------------------------


def vae_vs_pythae(data: TensorData, budget: Budget) -> dict:
    def build() -> VAE:
        return VAE(32, architecture="conv", hidden_dims=[32, 64, 128], iwae_samples=budget.iwae_samples)

    model = seeded(build)
    ours_s, trainer = ours(model, data)
    (metrics,) = make_trainer().test(model, datamodule=data, verbose=False)
    result = {"ours_s_per_epoch": ours_s, "ours_test_elbo_nats": metrics["test/elbo"],
              "ours_test_iwae_nll_nats": metrics["test/nll"]}  # fmt: skip
    if importlib.util.find_spec("pythae") is None:
        return {**result, "peer": "pythae not installed"}
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE as PythaeVAE
    from pythae.models import VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    nets = seeded(build)  # the same initial weights as ours

    class Encoder(BaseEncoder):
        def __init__(self) -> None:
            super().__init__()
            self.net = nets.encoder

        def forward(self, x):
            loc, log_var = self.net(x).chunk(2, dim=1)
            return ModelOutput(embedding=loc, log_covariance=log_var)

    class Decoder(BaseDecoder):
        def __init__(self) -> None:
            super().__init__()
            self.net = nets.decoder

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    class Timer(TrainingCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_epoch_begin(self, training_config, **kwargs) -> None:
            self.starts.append(time.perf_counter())

        def on_train_end(self, training_config, **kwargs) -> None:
            self.end = time.perf_counter()

    peer = PythaeVAE(VAEConfig(input_dim=(1, 28, 28), latent_dim=32, reconstruction_loss="bce"), Encoder(), Decoder())
    timer = Timer()
    with tempfile.TemporaryDirectory() as output_dir:
        config = BaseTrainerConfig(
            output_dir=output_dir, num_epochs=PEER_EPOCHS, per_device_train_batch_size=budget.batch_size,
            learning_rate=1e-3, optimizer_cls="Adam", no_cuda=True, steps_saving=None,
        )  # fmt: skip
        BaseTrainer(peer, BaseDataset(data.train, torch.zeros(len(data.train))), None, config, [timer]).train()
    peer_s = steady_seconds([b - a for a, b in zip(timer.starts, [*timer.starts[1:], timer.end], strict=True)])
    peer.eval()
    with torch.no_grad():
        elbo = -torch.cat([peer({"data": x}).loss[None] * len(x) for (x,) in data.test_dataloader()]).sum()
        elbo = float(elbo) / len(data.test)
        # pythae returns the mean IWAE estimate of log p(x), one test image at a time
        nll = -float(peer.get_nll(data.test, n_samples=budget.iwae_samples, batch_size=budget.iwae_samples))
    return {**result, "peer": "pythae", "peer_s_per_epoch": peer_s, "ours_vs_peer_speed": peer_s / ours_s,
            "peer_test_elbo_nats": elbo, "peer_test_iwae_nll_nats": nll}  # fmt: skip


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


def flow_vs_normflows(data: TensorData, budget: Budget) -> dict:
    model = seeded(lambda: Flow("glow", num_scales=2, num_steps=4, hidden_dims=(64, 64), quantization_levels=256))
    ours_s, _ = ours(model, data)
    (metrics,) = make_trainer().test(model, datamodule=data, verbose=False)
    result = {"ours_s_per_epoch": ours_s, "ours_test_bits_per_dim": metrics["test/bpd"]}
    if importlib.util.find_spec("normflows") is None:
        return {**result, "peer": "normflows not installed"}
    peer = seeded(normflows_glow)
    optimizer = torch.optim.Adam(peer.parameters(), lr=1e-3)

    def epoch() -> None:
        for (x,) in data.train_dataloader():
            optimizer.zero_grad(set_to_none=True)
            peer.forward_kld(dequantize(x)).backward()
            optimizer.step()

    peer_s = timed_epochs(epoch)
    with torch.no_grad():
        nll = torch.cat([-peer.log_prob(dequantize(x), None) for (x,) in data.test_dataloader()]).mean()
    dims = math.prod(data.test.shape[1:])
    bpd = float(nll) / (dims * math.log(2)) + 8  # density of (k + u) / 256 -> bits of the 8-bit k
    return {**result, "peer": "normflows", "peer_s_per_epoch": peer_s, "ours_vs_peer_speed": peer_s / ours_s,
            "peer_test_bits_per_dim": bpd}  # fmt: skip


# -- GAN: a plain DCGAN loop ---------------------------------------------------------------------


def gan_vs_plain_dcgan(data: TensorData, budget: Budget) -> dict:
    def build() -> GAN:
        return GAN(
            100,
            architecture="dcgan",
            hidden_dims=[64, 128],
            value_range=(0.0, 1.0),
            optimizer_g=partial(GeneratorAdam, lr=2e-4),
            optimizer_d=partial(DiscriminatorAdam, lr=2e-4),
        )

    ours_s, _ = ours(seeded(build), data)
    nets = seeded(build)
    generator, discriminator = nets.generator, nets.discriminator
    opt_g = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def epoch() -> None:
        for (x,) in data.train_dataloader():
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

    peer_s = timed_epochs(epoch)
    return {"ours_s_per_epoch": ours_s, "peer": "plain DCGAN loop", "peer_s_per_epoch": peer_s,
            "ours_vs_peer_speed": peer_s / ours_s}  # fmt: skip


def run(data_dir: str | Path, budget: Budget) -> dict:
    if not Path(data_dir).is_dir():
        print(f"\nPeers: skipped, no Fashion-MNIST in {data_dir}")
        return {"skipped": f"no Fashion-MNIST in {data_dir}"}
    train, test, budget = load_images(data_dir, budget)
    data = TensorData(train, test, budget.batch_size)
    results = {
        "setup": f"{PEER_EPOCHS} epochs of {len(train):,} Fashion-MNIST images (batch {budget.batch_size}), "
        f"test on {len(test):,}",
        "VAE": vae_vs_pythae(data, budget),
        "Flow": flow_vs_normflows(data, budget),
        "GAN": gan_vs_plain_dcgan(data, budget),
    }
    rows = []
    for family, r in ((k, v) for k, v in results.items() if isinstance(v, dict)):
        quality = {k.removeprefix("ours_"): v for k, v in r.items() if k.startswith("ours_test_")}
        for metric, value in quality.items():
            peer_value = r.get(f"peer_{metric}", "-")
            rows.append([family, r["peer"], r["ours_s_per_epoch"], r.get("peer_s_per_epoch", "-"),
                         r.get("ours_vs_peer_speed", "-"), metric, value, peer_value])  # fmt: skip
        if not quality:
            rows.append([family, r["peer"], r["ours_s_per_epoch"], r.get("peer_s_per_epoch", "-"),
                         r.get("ours_vs_peer_speed", "-"), "-", "-", "-"])  # fmt: skip
    print_table(
        f"Peers: {results['setup']}; s/epoch is the median of epochs 2..{PEER_EPOCHS}; peer/ours > 1: ours faster",
        ["family", "peer", "ours s/epoch", "peer s/epoch", "peer/ours time", "metric", "ours", "peer"],
        rows,
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick budget of quality.py")
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
