"""Does the GAN's weight average sample at least as well as the raw generator at every budget? FID on Fashion-MNIST.

    python benchmarks/gan_ema.py [--epochs 1 3 10] [--num-samples 10000] [--rampups 0.01 0.02 0.05] [--json PATH]

Trains the model, data and callbacks of ``configs/dcgan_fashion_mnist.yaml`` (seed 0) and after each listed epoch
computes the FID of ``num_samples`` samples against as many official test images, on the features of a
``Classifier`` trained once beforehand as ``configs/classifier_fashion_mnist.yaml`` says (offline features, so
on another scale than Inception FIDs). The generators compared all come from the one training run (an average
never changes the training), all with the same ``ema_decay``, batch-norm statistics recomputed for the averaged
weights, and the same latent vectors: the raw generator (``sample(use_ema=False)``), the model's own average
(``sample()``), a fixed decay (the rule before the warm-up), TensorFlow's warm-up min(decay, (1 + n) / (10 + n)),
and StyleGAN2's ramp-up (half-life at most ``rampup`` times the steps so far) for each of ``--rampups``. The FID
of as many training images against the test images is printed as the floor a perfect generator would reach.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the helpers beside it

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from common import FASHION_MNIST, add_common_args, apply_common_args, machine, make_trainer, print_table, write_json  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: E402

from callbacks.metrics import ClassifierFeatures  # noqa: E402
from datamodules import FashionMNISTDataModule  # noqa: E402
from dgm_lightning import GAN, Classifier  # noqa: E402
from dgm_lightning.nets.gan_nets import WarmupEMA  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class FixedEMA(WarmupEMA):
    """The average before the warm-up: the same decay from the second update on."""

    def decay_after(self, num_updates: int) -> float:
        return self.decay


class TensorFlowEMA(WarmupEMA):
    """TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``: min(decay, (1 + n) / (10 + n))."""

    def decay_after(self, num_updates: int) -> float:
        return min(self.decay, (1 + num_updates) / (10 + num_updates))


def resolve(class_path: str) -> Any:
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def instantiate(spec: dict[str, Any]) -> Any:
    """The object that a recipe's ``class_path`` and ``init_args`` describe. A nested one (a GAN's optimizers) is
    passed as the callable that builds it, as LightningCLI passes it."""
    args = {
        key: partial(resolve(value["class_path"]), **value.get("init_args", {}))
        if isinstance(value, dict) and "class_path" in value
        else value
        for key, value in spec.get("init_args", {}).items()
    }
    return resolve(spec["class_path"])(**args)


def recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text())


def train_classifier(data_dir: str, checkpoint: Path, epochs: int | None) -> float:
    """Train the feature classifier of configs/classifier_fashion_mnist.yaml (once: an existing checkpoint is
    reused); its test accuracy."""
    config = recipe("classifier_fashion_mnist.yaml")
    data = FashionMNISTDataModule(data_dir, batch_size=config["data"]["init_args"]["batch_size"])
    if checkpoint.is_file():
        classifier = Classifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    else:
        L.seed_everything(config["seed_everything"], verbose=False)
        classifier = instantiate(config["model"])
        trainer = make_trainer(max_epochs=epochs or config["trainer"]["max_epochs"])
        trainer.fit(classifier, datamodule=data)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(checkpoint)
    (metrics,) = make_trainer().test(classifier, datamodule=data, verbose=False)
    return float(metrics["test/accuracy"])


def to_unit(x: Tensor, value_range: tuple[float, float]) -> Tensor:
    low, high = value_range
    return ((x.float() - low) / (high - low)).clamp(0, 1)


class FIDAtEpochs(Callback):
    """Keeps the extra averages and, after each listed epoch, the FID of every generator (random state kept)."""

    def __init__(
        self, classifier: Classifier, real: Tensor, epochs: list[int], num_samples: int, rampups: list[float]
    ) -> None:
        self.epochs, self.num_samples, self.rampups = set(epochs), num_samples, rampups
        self.fid = FrechetInceptionDistance(ClassifierFeatures(classifier), reset_real_features=False, normalize=True)
        for start in range(0, real.shape[0], 500):
            self.fid.update(real[start : start + 500], real=True)
        self.averages: dict[str, WarmupEMA] = {}
        self.results: list[dict[str, float]] = []
        self.start = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: GAN) -> None:
        decay, rampup = pl_module.hparams.ema_decay, pl_module.hparams.ema_rampup  # (the first two ignore rampup)
        self.averages = {
            "fixed": FixedEMA(pl_module.generator, decay, rampup),
            "tensorflow": TensorFlowEMA(pl_module.generator, decay, rampup),
            **{f"rampup {r:g}": WarmupEMA(pl_module.generator, decay, rampup=r) for r in self.rampups},
        }

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: GAN, outputs, batch, batch_idx: int) -> None:
        if outputs is not None:  # the model's own average is updated on the same condition
            for average in self.averages.values():
                average.update_parameters(pl_module.generator)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: GAN) -> None:
        epoch = trainer.current_epoch + 1
        print(f"[gan_ema] epoch {epoch} trained, {time.perf_counter() - self.start:.0f} s", flush=True)
        if epoch not in self.epochs:
            return
        # the model's average as sample() uses it (batch-norm statistics recomputed for its weights); the other
        # averages get the same recomputation, so that only the decay rules differ
        nets = {"raw": pl_module.generator, "sample()": pl_module.sampling_net()}
        for name, average in self.averages.items():
            average.recompute_batch_norm(pl_module.statistics_inputs())
            nets[name] = average.module
        with torch.random.fork_rng():
            row = {"epoch": epoch, "generator_steps": int(pl_module.ema.n_averaged)}
            row.update({name: self.score(pl_module, net) for name, net in nets.items()})
        row["train_s"] = time.perf_counter() - self.start
        self.results.append(row)
        print(f"[gan_ema] {row}", flush=True)

    @torch.no_grad()
    def score(self, pl_module: GAN, net: nn.Module) -> float:
        """FID of num_samples samples of ``net`` (eval mode), from the same latents for every generator."""
        torch.manual_seed(0)
        was_training = net.training
        net.eval()
        try:
            for start in range(0, self.num_samples, 500):
                z = pl_module.latent(min(500, self.num_samples - start))
                fake = to_unit(pl_module.generator_output(z, None, net=net), pl_module.value_range)
                self.fid.update(fake, real=False)
        finally:
            net.train(was_training)
        value = float(self.fid.compute())
        self.fid.reset()  # the fake statistics only
        return value


def images(data: FashionMNISTDataModule, split: str, n: int) -> Tensor:
    """The first n images of a split, in [0, 1]."""
    loader = data.test_dataloader() if split == "test" else data.train_dataloader()
    batches, seen = [], 0
    for x, _ in loader:
        batches.append(x)
        seen += x.shape[0]
        if seen >= n:
            break
    return to_unit(torch.cat(batches)[:n], data.value_range)


def run(args) -> dict[str, Any]:
    config = recipe("dcgan_fashion_mnist.yaml")
    classifier_ckpt = Path(args.workdir) / "classifier_fashion_mnist.ckpt"
    accuracy = train_classifier(args.data_dir, classifier_ckpt, args.classifier_epochs)
    classifier = Classifier.load_from_checkpoint(classifier_ckpt, map_location="cpu", weights_only=True)

    data = instantiate(config["data"])
    data.setup("fit")
    data.setup("test")
    real_test = images(data, "test", args.num_samples)
    floor_fid = FrechetInceptionDistance(ClassifierFeatures(classifier), normalize=True)
    floor_fid.update(real_test, real=True)
    floor_fid.update(images(data, "train", args.num_samples), real=False)

    L.seed_everything(config["seed_everything"], verbose=False)
    gan = instantiate(config["model"])
    schedules = [
        instantiate(c) for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ParameterSchedule")
    ]
    measure = FIDAtEpochs(classifier, real_test, args.epochs, args.num_samples, args.rampups)
    trainer = make_trainer(
        max_epochs=max(args.epochs),
        limit_train_batches=args.limit_train_batches or 1.0,
        callbacks=[*schedules, measure],
    )
    trainer.fit(gan, datamodule=data)
    return {
        "machine": machine(),
        "protocol": {
            "recipe": "configs/dcgan_fashion_mnist.yaml",
            "ema_decay": gan.hparams.ema_decay,
            "num_samples": args.num_samples,
            "gan_batches_per_epoch": args.limit_train_batches or "all",
            "real_images": "official test split",
            "features": "Classifier (configs/classifier_fashion_mnist.yaml), penultimate layer",
            "classifier_test_accuracy": accuracy,
            "train_vs_test_fid": float(floor_fid.compute()),
        },
        "fid": measure.results,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(FASHION_MNIST))
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 10], help="measure after these epochs")
    parser.add_argument("--num-samples", type=int, default=10000, help="generated and real images per FID")
    parser.add_argument("--classifier-epochs", type=int, help="default: the classifier recipe's max_epochs")
    parser.add_argument("--workdir", default="runs/benchmarks/gan_ema", help="where the classifier is kept")
    parser.add_argument(
        "--rampups", type=float, nargs="*", default=[0.01, 0.02, 0.05], help="ramp-ups of extra averages to compare"
    )
    parser.add_argument("--limit-train-batches", type=int, help="GAN batches per epoch (default: all, 430)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    results = run(args)
    protocol = results["protocol"]
    print_table(
        f"FID on Fashion-MNIST ({protocol['num_samples']:,} samples vs test images, classifier features, test "
        f"accuracy {protocol['classifier_test_accuracy']:.3f}; train vs test images: "
        f"{protocol['train_vs_test_fid']:.3g}), ema_decay {protocol['ema_decay']}",
        list(results["fid"][0]),
        [list(row.values()) for row in results["fid"]],
    )
    if args.json:
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
