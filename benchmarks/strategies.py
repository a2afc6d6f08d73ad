"""The VAE's strategy space at a fixed CPU budget on binarized Fashion-MNIST: one table of objectives, priors and
latent geometries, and the Gaussian-against-hyperspherical comparison at latent_dim 2, 5 and 10.

    python benchmarks/strategies.py [--quick] [--data-dir /usr/share/datasets/fashion-mnist] [--json PATH]

Every run trains the same MLP VAE (hidden 512, 256) for the same number of batches on the binarized training images
(pixels > 0.5), with seed 0, then is tested on the official test split: test IWAE NLL and ELBO (nats per image),
active units (latent dimensions whose code varies by more than 0.01 over the test set) and the FID of its samples
on the features of a Classifier trained here with the same budget (offline; on another scale than Inception
FIDs), and the time per epoch. Davidson et al. 2018 (arXiv:1804.00891) report the hyperspherical latent ahead of
the Gaussian at low dimension on MNIST (d = 2, 5) and behind it at d = 20 and more; the last table says whether
these numbers agree at this budget.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the helpers beside it

import torch  # noqa: E402
from common import FASHION_MNIST, add_common_args, apply_common_args, machine, print_table, write_json  # noqa: E402
from quality import Budget, fit_and_test  # noqa: E402

from callbacks import GenerativeMetrics  # noqa: E402
from datamodules import FashionMNISTDataModule  # noqa: E402
from dgm_lightning import VAE, Classifier  # noqa: E402
from dgm_lightning.objectives import active_units  # noqa: E402

QUICK = Budget(epochs=1, train_batches=20, test_images=500, iwae_samples=20)
FULL = Budget(epochs=5, train_batches=None, test_images=2000, iwae_samples=100)

# (name, the VAE's settings): each option of the strategy space against the default, the rest left at its default
STRATEGIES: list[tuple[str, dict[str, Any]]] = [
    ("elbo (default)", {}),
    ("iwae, K = 5", {"objective": "iwae", "training_samples": 5}),
    ("miwae, 2 x 4", {"objective": "miwae", "training_samples": 8, "miwae_groups": 2}),
    ("piwae, 2 x 4", {"objective": "piwae", "training_samples": 8, "miwae_groups": 2}),
    ("beta_tc, beta 6", {"objective": "beta_tc", "beta": 6.0}),
    ("mmd (WAE), beta 0", {"objective": "mmd", "beta": 0.0}),
    ("mmd (InfoVAE), beta 1", {"objective": "mmd"}),
    ("mixture prior, 10", {"prior": "mixture"}),
    ("vamp prior, 500", {"prior": "vamp"}),
    ("power_spherical", {"posterior": "power_spherical"}),
    ("von_mises_fisher", {"posterior": "von_mises_fisher"}),
]
GEOMETRY_DIMS = (2, 5, 10)
GEOMETRIES = ("gaussian", "von_mises_fisher", "power_spherical")


def binarized(data_dir: str | Path, budget: Budget) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(
        str(data_dir), batch_size=budget.batch_size, eval_batch_size=budget.eval_batch_size, binarize=True
    )


def train_classifier(data_dir, budget: Budget, checkpoint: Path) -> float:
    """The offline feature extractor of the FID, trained with the same budget; returns its test accuracy."""
    classifier = Classifier(10, feature_dim=128, hidden_dims=(32, 64, 128))
    metrics, _ = fit_and_test(classifier, binarized(data_dir, budget), budget, save_to=checkpoint)
    return metrics["test/accuracy"]


def evaluate(settings: dict[str, Any], data_dir, budget: Budget, classifier: Path, latent_dim: int = 16) -> dict:
    """Train one VAE with the budget and test it: the table's columns."""
    torch.manual_seed(0)
    model = VAE(latent_dim, architecture="mlp", hidden_dims=[512, 256], iwae_samples=budget.iwae_samples, **settings)
    data = binarized(data_dir, budget)
    fid = GenerativeMetrics(metrics=("fid",), classifier_checkpoint=str(classifier), num_samples=budget.test_images)
    metrics, seconds = fit_and_test(model, data, budget, callbacks=[fid])
    test_images = torch.cat([batch[0] for batch in data.test_dataloader()])[: budget.test_images]
    with torch.no_grad():
        codes = model.eval().encode(test_images)
    return {
        "test_iwae_nll_nats": metrics["test/nll"],
        "test_elbo_nats": metrics["test/elbo"],
        "active_units": int(active_units(codes)),
        "fid": metrics["test/fid"],
        "s_per_epoch": seconds / budget.epochs,
    }


def run(data_dir: str | Path, budget: Budget, geometry: bool = True) -> dict:
    if not Path(data_dir).is_dir():
        print(f"\nStrategies: skipped, no Fashion-MNIST in {data_dir} (apt-get install dataset-fashion-mnist)")
        return {"skipped": f"no Fashion-MNIST in {data_dir}"}
    results: dict[str, Any] = {"budget": {**asdict(budget), "description": budget.describe()}}
    with tempfile.TemporaryDirectory() as workdir:
        classifier = Path(workdir) / "classifier.ckpt"
        results["classifier_test_accuracy"] = train_classifier(data_dir, budget, classifier)
        results["strategies"] = {
            name: evaluate(settings, data_dir, budget, classifier) for name, settings in STRATEGIES
        }
        if geometry:
            results["geometry"] = {
                f"{posterior}, d = {dim}": evaluate({"posterior": posterior}, data_dir, budget, classifier, dim)
                for dim in GEOMETRY_DIMS
                for posterior in GEOMETRIES
            }
    header = ["VAE", "test IWAE NLL", "test ELBO", "active units", "FID (classifier)", "s / epoch"]

    def rows(table: dict[str, dict]) -> list[list]:
        keys = ("test_iwae_nll_nats", "test_elbo_nats", "active_units", "fid", "s_per_epoch")
        return [[name, *(values[key] for key in keys)] for name, values in table.items()]

    title = f"VAE strategies on binarized Fashion-MNIST (latent_dim 16), budget: {budget.describe()}"
    print_table(title, header, rows(results["strategies"]))
    if geometry:
        print_table("Latent geometry: Gaussian against hyperspherical", header, rows(results["geometry"]))
    print(f"FID features: a Classifier at {results['classifier_test_accuracy']:.3f} test accuracy")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"budget: {QUICK.describe()}")
    parser.add_argument("--no-geometry", action="store_true", help="leave out the latent_dim 2/5/10 comparison")
    parser.add_argument("--epochs", type=int, help=f"epochs of the budget instead of its own ({FULL.epochs} full)")
    parser.add_argument("--data-dir", default=str(FASHION_MNIST))
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    budget = QUICK if args.quick else FULL
    budget = budget if args.epochs is None else replace(budget, epochs=args.epochs)
    results = {"machine": machine(), **run(args.data_dir, budget, not args.no_geometry)}
    if args.json:
        write_json(results, Path(args.json))
    return results


if __name__ == "__main__":
    main()
