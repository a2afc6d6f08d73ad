"""VQ-VAE and its PixelCNN prior against the VAE at a fixed CPU budget on Fashion-MNIST: reconstruction error,
codebook health and the FID of samples, in one table.

    python benchmarks/vqvae.py [--quick] [--data-dir /usr/share/datasets/fashion-mnist] [--json PATH] [--png PATH]

Every model trains on the same batches (seed 0, batch 128, grey levels in [0, 1], Bernoulli likelihood): the VQ-VAE
of configs/vqvae_fashion_mnist.yaml and the conv VAE of configs/vae_fashion_mnist.yaml for the same number of
epochs, then the VQ-VAE's prior (configs/vqvae_prior_fashion_mnist.yaml) on its frozen codes for as many more: the
two-stage model has had twice the epochs, and the table gives each model's training seconds. Tested on the official
test split: reconstruction error per image (squared error of the decoder mean, summed over pixels; Bernoulli NLL in
nats), the VQ-VAE's codebook perplexity and the fraction of codes used on the test images, the ELBO (nats per
image: the VAE's, and the two-stage model's log p(x | z_q) + log p(z), see VQVAEPrior), and the FID of samples
(temperature 1) on the features of a Classifier trained here on the same budget (offline; on another scale than
Inception FIDs). The VQ-VAE's samples from the uniform prior of its first stage show what the learned prior adds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the helpers beside it

import torch  # noqa: E402
from common import FASHION_MNIST, RESULTS, add_common_args, apply_common_args, machine, print_table, write_json  # noqa: E402
from quality import Budget, fashion_mnist, fit_and_test  # noqa: E402

from callbacks import GenerativeMetrics  # noqa: E402
from callbacks.images import save_png, to_uint8_grid  # noqa: E402
from dgm_lightning import VAE, VQVAE, Classifier, VQVAEPrior  # noqa: E402

# the VAE's test IWAE estimate is not in the table; 10 samples keep its test step short
QUICK = Budget(epochs=1, train_batches=30, test_images=500, iwae_samples=10)
FULL = Budget(epochs=2, train_batches=None, test_images=2000, iwae_samples=10)


def fid_callback(classifier: Path, budget: Budget) -> GenerativeMetrics:
    return GenerativeMetrics(metrics=("fid",), classifier_checkpoint=str(classifier), num_samples=budget.test_images)


@torch.no_grad()
def reconstruction_errors(model, images: torch.Tensor) -> dict[str, float]:
    """Squared error of the reconstruction (the decoder mean at the code) and the Bernoulli NLL, per image."""
    model.eval()
    recon = torch.cat([model.reconstruct(batch) for batch in images.split(250)])
    squared = (recon - images).pow(2).flatten(1).sum(1).mean()
    bce = torch.nn.functional.binary_cross_entropy(recon.clamp(1e-6, 1 - 1e-6), images, reduction="none")
    return {"squared_error": float(squared), "bernoulli_nll": float(bce.flatten(1).sum(1).mean())}


@torch.no_grad()
def codebook_health(vqvae: VQVAE, images: torch.Tensor) -> dict[str, float]:
    """Perplexity and fraction of codes used over the code grids of the images."""
    from dgm_lightning.nets.quantizer import perplexity

    vqvae.eval()
    index = torch.cat([vqvae.encode_indices(batch) for batch in images.split(250)])
    counts = torch.bincount(index.flatten(), minlength=vqvae.num_embeddings)
    return {"perplexity": float(perplexity(counts)), "codes_used": float((counts > 0).float().mean())}


def run(data_dir: str | Path, budget: Budget, png: Path | None) -> dict:
    if not Path(data_dir).is_dir():
        print(f"\nVQ-VAE: skipped, no Fashion-MNIST in {data_dir} (apt-get install dataset-fashion-mnist)")
        return {"skipped": f"no Fashion-MNIST in {data_dir}"}
    data = fashion_mnist(data_dir, budget)
    data.setup("test")
    test_images = torch.cat([batch[0] for batch in data.test_dataloader()])[: budget.test_images]
    results: dict = {"budget": {**asdict(budget), "description": budget.describe()}}
    with tempfile.TemporaryDirectory() as workdir:
        classifier_path = Path(workdir) / "classifier.ckpt"
        classifier = Classifier(10, feature_dim=128, hidden_dims=(32, 64, 128))
        metrics, _ = fit_and_test(classifier, fashion_mnist(data_dir, budget), budget, save_to=classifier_path)
        results["classifier_test_accuracy"] = metrics["test/accuracy"]

        torch.manual_seed(0)
        vae = VAE(32, architecture="conv", hidden_dims=[32, 64, 128], iwae_samples=budget.iwae_samples)
        metrics, seconds = fit_and_test(
            vae, fashion_mnist(data_dir, budget), budget, [fid_callback(classifier_path, budget)]
        )
        results["VAE"] = {
            **reconstruction_errors(vae, test_images), "elbo": metrics["test/elbo"], "fid": metrics["test/fid"],
            "train_s": seconds,
        }  # fmt: skip

        torch.manual_seed(0)
        vqvae = VQVAE(128, 16, hidden_dims=[32, 64], residual_blocks=1, residual_channels=32)
        vqvae_path = Path(workdir) / "vqvae.ckpt"
        metrics, vq_seconds = fit_and_test(
            vqvae, fashion_mnist(data_dir, budget), budget, [fid_callback(classifier_path, budget)], save_to=vqvae_path
        )
        results["VQ-VAE, uniform prior"] = {
            **reconstruction_errors(vqvae, test_images), **codebook_health(vqvae, test_images),
            "elbo": metrics["test/elbo"], "fid": metrics["test/fid"], "train_s": vq_seconds,
        }  # fmt: skip

        torch.manual_seed(0)
        prior = VQVAEPrior(str(vqvae_path), channels=64, num_layers=6, kernel_size=3)
        metrics, seconds = fit_and_test(
            prior, fashion_mnist(data_dir, budget), budget, [fid_callback(classifier_path, budget)]
        )
        results["VQ-VAE + PixelCNN prior"] = {
            **{key: results["VQ-VAE, uniform prior"][key] for key in ("squared_error", "bernoulli_nll")},
            **{key: results["VQ-VAE, uniform prior"][key] for key in ("perplexity", "codes_used")},
            "elbo": metrics["test/elbo"], "bits_per_code": metrics["test/bits_per_code"], "fid": metrics["test/fid"],
            "train_s": vq_seconds + seconds,
        }  # fmt: skip
        if png is not None:
            save_sample_grids(prior, vae, test_images, png)
            results["sample_grid"] = png.name
    header = ["model", "sq. error / image", "BCE / image", "perplexity", "codes used", "ELBO (nats)", "FID", "train s"]
    rows = [
        [name, r["squared_error"], r["bernoulli_nll"], r.get("perplexity", "-"), r.get("codes_used", "-"), r["elbo"],
         r["fid"], r["train_s"]]
        for name, r in results.items() if isinstance(r, dict) and "fid" in r
    ]  # fmt: skip
    print_table(f"VQ-VAE against the VAE on Fashion-MNIST, budget: {budget.describe()}", header, rows)
    print(
        f"FID features: a Classifier at {results['classifier_test_accuracy']:.3f} test accuracy. The two-stage model "
        "trained its prior for as many epochs again (its train s includes both stages)."
    )
    return results


@torch.no_grad()
def save_sample_grids(prior: VQVAEPrior, vae: VAE, test_images: torch.Tensor, png: Path) -> None:
    """One PNG: rows of test images and their VQ-VAE reconstructions, 64 samples of the two-stage model, 64 of the
    VAE (8 x 8 each, side by side below)."""
    torch.manual_seed(0)
    prior.eval(), vae.eval()
    x = test_images[:16]
    recon = to_uint8_grid(torch.cat([x, prior.reconstruct(x)]), (0.0, 1.0), nrow=16)
    samples = torch.cat([prior.sample(64), torch.ones(8, 1, 28, 28), vae.sample(64)])  # a white column between
    rows = torch.cat([samples[:64].view(8, 8, 1, 28, 28), samples[64:72].view(8, 1, 1, 28, 28),
                      samples[72:].view(8, 8, 1, 28, 28)], dim=1).flatten(0, 1)  # fmt: skip
    grid = to_uint8_grid(rows, (0.0, 1.0), nrow=17)
    width = max(recon.shape[2], grid.shape[2])
    pad = lambda g: torch.nn.functional.pad(g, (0, width - g.shape[2]), value=255)  # noqa: E731
    png.parent.mkdir(parents=True, exist_ok=True)
    save_png(torch.cat([pad(recon), pad(grid)], dim=1), png)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"budget: {QUICK.describe()}")
    parser.add_argument("--data-dir", default=str(FASHION_MNIST))
    parser.add_argument("--png", default=str(RESULTS / "vqvae_samples.png"), help="the sample grid ('' for none)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    png = Path(args.png) if args.png else None
    results = {"machine": machine(), "vqvae": run(args.data_dir, QUICK if args.quick else FULL, png)}
    if args.json:
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
