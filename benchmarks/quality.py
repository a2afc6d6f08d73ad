"""Quality at a fixed CPU budget on Fashion-MNIST: VAE test ELBO and IWAE NLL, flow test bits/dim, GAN FID/KID.

    python benchmarks/quality.py [--quick] [--data-dir /usr/share/datasets/fashion-mnist] [--json PATH]

The budget is a number of training batches per model (the same for every model and for the peers in peers.py)
and a number of test images; ``--quick`` trains on a fraction of an epoch and tests on a subset, and the
printed table says so. FID and KID use the features of a ``Classifier`` trained here on the same data with
the same budget (offline; so on another scale than Inception-feature FIDs such as Lucic et al. 2018's best,
21.5 (WGAN) to 30.7 (LSGAN) on Fashion-MNIST). Bits/dim are those of the 8-bit images (Glow trained to
convergence: about 3.1). The published numbers are context for long training, not targets for a short budget.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the helpers beside it

import lightning as L  # noqa: E402
from common import FASHION_MNIST, add_common_args, apply_common_args, machine, make_trainer, print_table, write_json  # noqa: E402

from callbacks import GenerativeMetrics  # noqa: E402
from datamodules import FashionMNISTDataModule  # noqa: E402
from dgm_lightning import GAN, VAE, Classifier, Flow  # noqa: E402
from dgm_lightning.optimizers import DiscriminatorAdam, GeneratorAdam  # noqa: E402
from dgm_lightning.precision import default_precision  # noqa: E402


@dataclass(frozen=True)
class Budget:
    """What every model gets: ``epochs`` passes over ``train_batches`` batches (None: the whole training set) of
    ``batch_size`` images, then a test on ``test_images`` official test images in batches of ``eval_batch_size``
    (which divides every budget's ``test_images``, so that the test sees exactly that many); ``iwae_samples`` for
    the NLL."""

    epochs: int
    train_batches: int | None
    test_images: int
    batch_size: int = 128
    eval_batch_size: int = 500
    iwae_samples: int = 100

    def describe(self) -> str:
        seen = "all 55,000" if self.train_batches is None else f"{self.train_batches * self.batch_size:,}"
        return (
            f"{self.epochs} epoch(s) x {seen} training images (batch {self.batch_size}), "
            f"test on {self.test_images:,} official test images, IWAE with {self.iwae_samples} samples"
        )

    def __post_init__(self) -> None:
        if self.test_images % self.eval_batch_size:
            raise ValueError(f"eval_batch_size {self.eval_batch_size} must divide test_images {self.test_images}")

    @property
    def test_batches(self) -> int:
        return self.test_images // self.eval_batch_size


QUICK = Budget(epochs=1, train_batches=30, test_images=500, iwae_samples=50)
# one epoch: the full run's 30 minutes on 2 CPU cores hold one pass of the DCGAN over the 55,000 images (4 minutes)
# beside the peers; three epochs did not finish in 45
FULL = Budget(epochs=1, train_batches=None, test_images=10000, iwae_samples=100)


def fashion_mnist(data_dir: str | Path, budget: Budget, value_range=(0.0, 1.0)) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(
        str(data_dir), batch_size=budget.batch_size, eval_batch_size=budget.eval_batch_size, value_range=value_range
    )


def fit_and_test(
    model: L.LightningModule, data, budget: Budget, callbacks=(), save_to: Path | None = None
) -> tuple[dict, dict]:
    """Train with the budget in the model's default precision here (saving a checkpoint to ``save_to``), then test
    in float32; the test metrics, and the training's ``train_s`` (seconds) and ``precision``."""
    L.seed_everything(0, verbose=False)
    precision = default_precision(model)
    train = make_trainer(max_epochs=budget.epochs, limit_train_batches=budget.train_batches or 1.0, precision=precision)
    start = time.perf_counter()
    train.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    if save_to is not None:
        train.save_checkpoint(save_to)
    test = make_trainer(limit_test_batches=budget.test_batches, callbacks=list(callbacks))
    (metrics,) = test.test(model, datamodule=data, verbose=False)
    return {k: float(v) for k, v in metrics.items()}, {"train_s": seconds, "precision": precision}


def vae_quality(data_dir, budget: Budget) -> dict[str, float]:
    model = VAE(32, architecture="conv", hidden_dims=[32, 64, 128], iwae_samples=budget.iwae_samples)
    metrics, training = fit_and_test(model, fashion_mnist(data_dir, budget), budget)
    return {"test_elbo_nats": metrics["test/elbo"], "test_iwae_nll_nats": metrics["test/nll"], **training}


def flow_quality(data_dir, budget: Budget) -> dict[str, float]:
    model = Flow("glow", num_scales=2, num_steps=4, hidden_dims=(64, 64), quantization_levels=256)
    metrics, training = fit_and_test(model, fashion_mnist(data_dir, budget), budget)
    return {"test_bits_per_dim": metrics["test/bpd"], **training}


def gan_quality(data_dir, budget: Budget, workdir: Path) -> dict[str, float]:
    """DCGAN FID/KID on the features of a classifier trained with the same budget (its accuracy reported too)."""
    classifier = Classifier(10, feature_dim=128, hidden_dims=(32, 64, 128))
    checkpoint = workdir / "classifier.ckpt"
    class_metrics, _ = fit_and_test(classifier, fashion_mnist(data_dir, budget), budget, save_to=checkpoint)
    gan = GAN(
        100,
        architecture="dcgan",
        hidden_dims=[64, 128],
        optimizer_g=partial(GeneratorAdam, lr=2e-4),
        optimizer_d=partial(DiscriminatorAdam, lr=2e-4),
    )
    kid_subset = min(100, budget.test_images)
    metrics_callback = GenerativeMetrics(
        metrics=("fid", "kid"), classifier_checkpoint=str(checkpoint), num_samples=budget.test_images,
        kid_subset_size=kid_subset,
    )  # fmt: skip
    data = fashion_mnist(data_dir, budget, value_range=(-1.0, 1.0))
    metrics, training = fit_and_test(gan, data, budget, callbacks=[metrics_callback])
    return {
        "fid": metrics["test/fid"],
        "kid": metrics["test/kid"],
        "classifier_test_accuracy": class_metrics["test/accuracy"],
        **training,
    }


def run(data_dir: str | Path, budget: Budget) -> dict:
    if not Path(data_dir).is_dir():
        print(f"\nQuality: skipped, no Fashion-MNIST in {data_dir} (apt-get install dataset-fashion-mnist)")
        return {"skipped": f"no Fashion-MNIST in {data_dir}"}
    with tempfile.TemporaryDirectory() as workdir:
        results = {
            "budget": {**asdict(budget), "description": budget.describe()},
            "VAE": vae_quality(data_dir, budget),
            "Flow": flow_quality(data_dir, budget),
            "GAN": gan_quality(data_dir, budget, Path(workdir)),
        }
    vae, flow, gan = results["VAE"], results["Flow"], results["GAN"]

    def row(model: str, metric: str, value: float, trained: dict, anchor: str = "-") -> list:
        return [model, metric, value, trained["precision"], trained["train_s"], anchor]

    print_table(
        f"Quality on Fashion-MNIST, budget: {budget.describe()}; trained in the default precision here, tested in "
        "float32",
        ["model", "metric", "value", "trained in", "train s", "published anchor (long training)"],
        [
            row("VAE (conv)", "test ELBO, nats", vae["test_elbo_nats"], vae),
            row("VAE (conv)", "test IWAE NLL, nats", vae["test_iwae_nll_nats"], vae),
            row("Glow (2x4, 64 ch)", "test bits/dim", flow["test_bits_per_dim"], flow, "Glow ~3.1"),
            row("DCGAN", "FID (classifier features)", gan["fid"], gan, "21.5-30.7 (Inception)"),
            row("DCGAN", "KID (classifier features)", gan["kid"], gan),
            ["Classifier", "test accuracy", gan["classifier_test_accuracy"], "-", "-", "-"],
        ],
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"budget: {QUICK.describe()}")
    parser.add_argument("--data-dir", default=str(FASHION_MNIST))
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    results = {"machine": machine(), "quality": run(args.data_dir, QUICK if args.quick else FULL)}
    if args.json:
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
