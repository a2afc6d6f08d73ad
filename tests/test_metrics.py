"""Generative metrics: the offline classifier, FID/KID against float64 references, the callback end to end."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from callbacks import ClassifierFeatures, GenerativeMetrics, InceptionFeatures
from datamodules import DigitsDataModule
from dgm_lightning import VAE, Classifier
from tests.helpers import PRINT_IMPORTS, assert_imported_the_tree_under_test, trainer, tree_under_test_env


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def classifier_checkpoint(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    model = Classifier(10, data_shape=(1, 8, 8), feature_dim=32, hidden_dims=[16, 32])
    t = trainer(max_epochs=8, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=folder, save_last=True)])
    t.fit(model, datamodule=digits)
    (result,) = t.test(model, datamodule=digits, verbose=False)
    return folder / "last.ckpt", result["test/accuracy"]


def test_the_offline_classifier_learns_digits(classifier_checkpoint):
    _, accuracy = classifier_checkpoint
    # seen: 0.92 test accuracy after 8 epochs
    assert accuracy > 0.85


@pytest.fixture(scope="module")
def features(classifier_checkpoint):
    classifier = Classifier.load_from_checkpoint(classifier_checkpoint[0], weights_only=True)
    return ClassifierFeatures(classifier, "features")


def unit_images(digits, split="test"):
    return digits.splits[split].tensors[0]  # digits are in [0, 1] already


def fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """FID in float64 from feature matrices (N, D), with scipy's matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_matches_a_float64_reference_is_zero_for_a_set_against_itself_and_grows_with_noise(digits, features):
    real = unit_images(digits)
    generator = torch.Generator().manual_seed(0)

    def fid(fake):
        metric = FrechetInceptionDistance(features, normalize=True)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        return metric.compute().item()

    assert abs(fid(real)) < 1e-3
    noisy = [(real + s * torch.randn(real.shape, generator=generator)).clamp(0, 1) for s in (0.1, 0.3, 0.6)]
    scores = [fid(x) for x in noisy]
    assert scores[0] < scores[1] < scores[2] and scores[0] > 0, scores
    with torch.no_grad():
        reference = fid_reference(features(real).double().numpy(), features(noisy[1]).double().numpy())
    assert scores[1] == pytest.approx(reference, rel=1e-3)


def test_kid_matches_a_float64_reference(digits, features):
    real, fake = unit_images(digits)[:100], unit_images(digits, "val")[:100]
    metric = KernelInceptionDistance(features, subsets=1, subset_size=100, normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    kid = metric.compute()[0].item()
    with torch.no_grad():
        x, y = features(real).double(), features(fake).double()
    d = x.shape[1]
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731  (the polynomial kernel of the KID paper)
    n = x.shape[0]
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    mmd = (k_xx.sum() - k_xx.trace()) / (n * (n - 1)) + (k_yy.sum() - k_yy.trace()) / (n * (n - 1))
    mmd -= 2 * k_xy.mean()
    assert kid == pytest.approx(mmd.item(), rel=1e-3)  # torchmetrics sums kernels in float32


def test_callback_logs_fid_kid_is_while_training_and_testing(digits, classifier_checkpoint, tmp_path):
    metrics = GenerativeMetrics(
        metrics=["fid", "kid", "is"], classifier_checkpoint=str(classifier_checkpoint[0]),
        num_samples=150, batch_size=64, kid_subset_size=50,
    )  # fmt: skip
    model = VAE(latent_dim=4, data_shape=(1, 8, 8), hidden_dims=[64])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(max_epochs=3, enable_checkpointing=True, callbacks=[metrics, checkpoint])
    t.fit(model, datamodule=digits)
    logged = {k: v.item() for k, v in t.callback_metrics.items()}
    assert {"val/fid", "val/kid", "val/kid_std", "val/is", "val/is_std"} <= set(logged)
    assert logged["val/fid"] > 0 and 1 <= logged["val/is"] <= 10  # IS lies between 1 and the number of classes
    (test,) = t.test(model, datamodule=digits, verbose=False)
    assert test["test/fid"] > 0 and "test/kid" in test
    # the feature extractor is the callback's, never part of the model's checkpoint
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert not any("classifier" in key for key in state)


def replay(images: torch.Tensor):
    """A stand-in for ``model.sample``: the given images in order, from the first again once all are drawn."""
    position = 0

    def sample(n: int, **_) -> torch.Tensor:
        nonlocal position
        drawn = images[position : position + n]
        position = (position + n) % len(images)
        return drawn

    return sample


def inception_score_by_hand(log_probs: torch.Tensor, permutation: torch.Tensor, splits: int = 10) -> float:
    """IS = mean over splits of exp(E_x KL(p(y | x) || p(y))), p(y) the split's mean prediction (float64)."""
    scores = []
    for chunk in log_probs[permutation].double().chunk(splits):
        p_y = chunk.exp().mean(0)
        kl = (chunk.exp() * (chunk - p_y.log())).sum(1)
        scores.append(kl.mean().exp())
    return torch.stack(scores).mean().item()


def test_callback_fid_is_zero_for_the_real_images_and_large_for_noise_and_is_matches_a_hand_computation(
    digits, classifier_checkpoint, monkeypatch
):
    # torchmetrics' IS shuffles the samples into its splits with the global random state: seeded here, so that
    # the hand computation can split them alike
    seeded_compute = InceptionScore.compute
    monkeypatch.setattr(InceptionScore, "compute", lambda self: (torch.manual_seed(0), seeded_compute(self))[1])
    permutation = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    metrics = GenerativeMetrics(
        metrics=["fid", "is"], classifier_checkpoint=str(classifier_checkpoint[0]), num_samples=150, batch_size=64
    )
    model = VAE(latent_dim=4, data_shape=(1, 8, 8), hidden_dims=[16])
    real = unit_images(digits, "val")[:150]  # the callback's real images: the first 150 of the validation loader
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0))
    classifier = Classifier.load_from_checkpoint(classifier_checkpoint[0], weights_only=True)
    features, log_probs = ClassifierFeatures(classifier, "features"), ClassifierFeatures(classifier, "logits")
    results = {}
    for name, samples in (("real", real), ("noise", noise)):
        model.sample = replay(samples)
        (results[name],) = trainer(callbacks=[metrics]).validate(model, datamodule=digits, verbose=False)
        with torch.no_grad():
            is_by_hand = inception_score_by_hand(log_probs(samples), permutation)
        assert results[name]["val/is"] == pytest.approx(is_by_hand, rel=1e-5), name
    with torch.no_grad():
        fid_noise = fid_reference(features(real).double().numpy(), features(noise).double().numpy())
        fid_real_sets = fid_reference(features(real).double().numpy(), features(unit_images(digits)).double().numpy())
    # seen: 2e-11 for the real images against themselves, 3.9 against the test images, 58 for uniform noise
    assert abs(results["real"]["val/fid"]) < 1e-2
    assert results["noise"]["val/fid"] == pytest.approx(fid_noise, rel=1e-3)
    assert fid_noise > 5 * fid_real_sets
    # the classifier tells the real digits apart, not the noise: seen IS 4.3 against 1.5 (splits of 15 images)
    assert results["real"]["val/is"] > 2 * results["noise"]["val/is"], results


def test_samples_improve_fid_over_an_untrained_model(digits, classifier_checkpoint):
    metrics = GenerativeMetrics(
        classifier_checkpoint=str(classifier_checkpoint[0]), num_samples=180, kid_subset_size=50
    )
    model = VAE(latent_dim=8, data_shape=(1, 8, 8), hidden_dims=[128])
    t = trainer(max_epochs=1, limit_train_batches=0, callbacks=[metrics])
    (before,) = t.test(model, datamodule=digits, verbose=False)
    trainer(max_epochs=10).fit(model, datamodule=digits)
    (after,) = t.test(model, datamodule=digits, verbose=False)
    # seen: FID 121 untrained and 44 after 10 epochs on these classifier features
    assert after["test/fid"] < 0.5 * before["test/fid"], (before, after)


def test_too_few_samples_fail_clearly(digits, classifier_checkpoint):
    with pytest.raises(ValueError, match="kid_subset_size <= num_samples"):
        GenerativeMetrics(num_samples=50, kid_subset_size=100)
    with pytest.raises(ValueError, match="unknown metrics"):
        GenerativeMetrics(metrics=["fid", "precision"])
    metrics = GenerativeMetrics(
        classifier_checkpoint=str(classifier_checkpoint[0]), num_samples=500, kid_subset_size=400
    )
    with pytest.raises(ValueError, match="only 180 real images.*fewer than kid_subset_size=400"):
        trainer(max_epochs=1, limit_train_batches=1, callbacks=[metrics]).fit(
            VAE(data_shape=(1, 8, 8)), datamodule=digits
        )


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_points_at_the_extra_and_the_offline_option():
    with pytest.raises(ModuleNotFoundError, match=r"torch-fidelity.*classifier_checkpoint"):
        InceptionFeatures("2048")


def test_a_missing_inception_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-weights.pth"):
        InceptionFeatures("2048", weights_path=str(tmp_path / "no-weights.pth"))


DDP_SCRIPT = """
import sys
import lightning as L
from callbacks import GenerativeMetrics
from datamodules import DigitsDataModule
from dgm_lightning import VAE

L.seed_everything(0)
metrics = GenerativeMetrics(classifier_checkpoint=sys.argv[1], num_samples=100, kid_subset_size=20)
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[metrics],
)
trainer.fit(VAE(data_shape=(1, 8, 8), latent_dim=4, hidden_dims=[16]), datamodule=DigitsDataModule())
print(f"rank {trainer.global_rank} fid {trainer.callback_metrics['val/fid'].item():.6f}", flush=True)
"""


def test_metrics_under_ddp_agree_across_ranks_and_do_not_hang(classifier_checkpoint, tmp_path):
    (tmp_path / "ddp_metrics.py").write_text(DDP_SCRIPT + PRINT_IMPORTS)
    result = subprocess.run(
        [sys.executable, "ddp_metrics.py", str(classifier_checkpoint[0])],
        cwd=tmp_path, env=tree_under_test_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert_imported_the_tree_under_test(result.stdout, packages=("dgm_lightning", "datamodules", "callbacks"))
    # the two processes share stdout, so their lines can interleave: find the reports, not the lines
    reports = sorted(re.findall(r"rank (\d) fid (\d+\.\d{6})", result.stdout))
    assert [rank for rank, _ in reports] == ["0", "1"], result.stdout[-2000:]
    fids = [float(fid) for _, fid in reports]
    assert fids[0] == pytest.approx(fids[1], rel=1e-6)  # one FID, reduced over both ranks' samples
