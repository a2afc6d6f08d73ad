"""FID, KID and Inception Score of a model's samples, with torchmetrics, on Inception or offline classifier features."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from typing_extensions import override

from dgm_lightning.checks import check_positive

METRICS = ("fid", "kid", "is")


class ClassifierFeatures(nn.Module):
    """A trained ``Classifier`` as a torchmetrics feature extractor: images in [0, 1] -> features or logits.

    Args:
        classifier: the trained classifier (frozen here).
        output: ``features`` (penultimate layer, for FID/KID) or ``logits`` (for IS).
    """

    def __init__(self, classifier: nn.Module, output: str = "features") -> None:
        super().__init__()
        if output not in ("features", "logits"):
            raise ValueError(f"unknown output {output!r}; choose one of: features, logits")
        self.classifier = classifier.eval().requires_grad_(False)
        self.output = output
        self.num_features = classifier.feature_dim if output == "features" else classifier.num_classes

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)  # stays in eval mode: batch statistics must not change the features

    def forward(self, images: Tensor) -> Tensor:
        low, high = self.classifier.value_range
        x = images.to(next(self.classifier.parameters()).dtype) * (high - low) + low
        if self.output == "features":
            return self.classifier.features(x)
        # torchmetrics' IS takes log(softmax(.)), which is -inf where a confident classifier's probability
        # underflows to 0 (and 0 * inf = NaN); a floor of e^-100 on the probabilities changes IS by < 1e-40
        return torch.log_softmax(self.classifier(x).double(), dim=1).clamp(min=-100.0)


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3 (the network FID was defined with): images in [0, 1] -> features or logits.

    Grey images are repeated to three channels; the network resizes to 299x299 itself.

    Args:
        output: ``2048`` (pool features, for FID/KID) or ``logits_unbiased`` (for IS).
        weights_path: a local copy of the weights (``pt_inception-2015-12-05-6726825d.pth``) for machines
            without internet; by default torch-fidelity downloads them once.
    """

    def __init__(self, output: str = "2048", weights_path: str | None = None) -> None:
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as error:  # pragma: no cover - torchmetrics always has it
            raise ImportError("this torchmetrics has no Inception network") from error
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"Inception weights not found at {weights_path} (inception_weights)")
        try:
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=[output], feature_extractor_weights_path=weights_path
            )
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                "Inception features need torch-fidelity: pip install 'dgm-lightning[inception]'; "
                "or use offline features: GenerativeMetrics(classifier_checkpoint=...)"
            ) from error
        self.num_features = 1008 if output == "logits_unbiased" else int(output)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net((images.clamp(0, 1) * 255).to(torch.uint8))


class GenerativeMetrics(Callback):
    """FID, KID and IS of ``model.sample()`` against real data, every N validation epochs and at test time.

    Real images come from the validation (or test) dataloader; their features are computed once and
    kept. Under DDP every rank draws its share of samples and real images and torchmetrics reduces the
    statistics across ranks, so all ranks compute together. Logged as ``val/fid``, ``val/kid``
    (``val/kid_std``), ``val/is``, and ``test/...``.

    Args:
        metrics: any of ``fid``, ``kid``, ``is``.
        classifier_checkpoint: a ``Classifier`` checkpoint whose features replace Inception's (offline).
        inception_weights: a local file of the Inception weights (when not using a classifier).
        num_samples: generated (and real) images per evaluation, over all ranks.
        every_n_epochs: evaluate after every n-th validation epoch.
        batch_size: images generated per call to ``sample``.
        kid_subset_size: samples per KID subset; at most num_samples.
        seed: seed of the sampling noise (plus the rank).

    References: FID, Heusel et al. 2017, arXiv:1706.08500; KID, Bińkowski et al. 2018, arXiv:1801.01401;
        IS, Salimans et al. 2016, arXiv:1606.03498.
    """

    def __init__(
        self,
        *,
        metrics: list[str] | tuple[str, ...] = ("fid", "kid"),
        classifier_checkpoint: str | None = None,
        inception_weights: str | None = None,
        num_samples: int = 1000,
        every_n_epochs: int = 1,
        batch_size: int = 250,
        kid_subset_size: int = 100,
        seed: int = 0,
    ) -> None:
        unknown = set(metrics) - set(METRICS)
        if unknown or not metrics:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from: {', '.join(METRICS)}")
        check_positive(num_samples=num_samples, every_n_epochs=every_n_epochs, batch_size=batch_size)
        if "kid" in metrics and not 2 <= kid_subset_size <= num_samples:
            raise ValueError(
                f"KID needs 2 <= kid_subset_size <= num_samples, got kid_subset_size={kid_subset_size} and "
                f"num_samples={num_samples}; lower kid_subset_size or draw more samples"
            )
        self.metric_names = tuple(metrics)
        self.classifier_checkpoint = classifier_checkpoint
        self.inception_weights = inception_weights
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.kid_subset_size = kid_subset_size
        self.seed = seed
        self._metrics: dict[str, dict[str, Metric]] = {}
        self._has_real: set[str] = set()

    def feature_extractors(self) -> tuple[nn.Module, nn.Module]:
        """(features for FID/KID, logits for IS), from the classifier checkpoint or Inception."""
        if self.classifier_checkpoint is None:
            return InceptionFeatures("2048", self.inception_weights), InceptionFeatures(
                "logits_unbiased", self.inception_weights
            )
        from dgm_lightning.classifier import Classifier

        # loaded on the CPU and outside the model, so that generative checkpoints never include it
        classifier = Classifier.load_from_checkpoint(self.classifier_checkpoint, map_location="cpu", weights_only=True)
        return ClassifierFeatures(classifier, "features"), ClassifierFeatures(classifier, "logits")

    def build_metrics(self, device: torch.device) -> dict[str, Metric]:
        features, logits = self.feature_extractors()
        built: dict[str, Metric] = {}
        if "fid" in self.metric_names:
            built["fid"] = FrechetInceptionDistance(features, reset_real_features=False, normalize=True)
        if "kid" in self.metric_names:
            built["kid"] = KernelInceptionDistance(
                features, subset_size=self.kid_subset_size, reset_real_features=False, normalize=True
            )
        if "is" in self.metric_names:
            # normalize=False: with it, torchmetrics' IS turns the images into uint8 0..255 even for a custom
            # extractor (its FID does not), and both extractors here take floats in [0, 1]
            built["is"] = InceptionScore(logits, normalize=False)
        return {name: metric.to(device) for name, metric in built.items()}

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.evaluate(trainer, pl_module, "val", trainer.val_dataloaders)

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module, "test", trainer.test_dataloaders)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, dataloaders) -> dict[str, Tensor]:
        """Update the metrics with real (once) and generated images, compute, log and return them."""
        if stage not in self._metrics:
            self._metrics[stage] = self.build_metrics(pl_module.device)
        metrics = self._metrics[stage]
        per_rank = -(-self.num_samples // trainer.world_size)  # ceil: every rank draws its share
        to_unit = self._to_unit_range(pl_module)
        if stage not in self._has_real:
            self._update_real(metrics, dataloaders, pl_module, per_rank, to_unit)
            self._has_real.add(stage)
        # a fixed seed per rank: every rank draws other samples, the same ones at every evaluation, and
        # the training's random state is left as it was (resumed runs stay reproducible)
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + trainer.global_rank)
            for start in range(0, per_rank, self.batch_size):
                fake = to_unit(pl_module.sample(min(self.batch_size, per_rank - start)))
                for name, metric in metrics.items():
                    if name == "is":
                        metric.update(fake)
                    else:
                        metric.update(fake, real=False)
        results = {}
        for name, metric in metrics.items():
            value = metric.compute()
            if name == "fid":
                results["fid"] = value
            else:  # KID and IS return (mean, std)
                results[name], results[f"{name}_std"] = value
            metric.reset()  # fake statistics only: reset_real_features=False keeps the real ones
        pl_module.log_dict({f"{stage}/{k}": v.float() for k, v in results.items()}, sync_dist=False)
        return results

    def _update_real(self, metrics: dict[str, Metric], dataloaders, pl_module, per_rank: int, to_unit) -> None:
        loader = dataloaders[0] if isinstance(dataloaders, (list, tuple)) else dataloaders
        seen = 0
        for batch in loader:
            x, _ = pl_module.unpack_batch(batch)
            x = to_unit(x[: per_rank - seen].to(pl_module.device))
            for name in ("fid", "kid"):
                if name in metrics:
                    metrics[name].update(x, real=True)
            seen += x.shape[0]
            if seen >= per_rank:
                return
        if "kid" in metrics and seen < self.kid_subset_size:
            raise ValueError(
                f"GenerativeMetrics: only {seen} real images on this rank, fewer than kid_subset_size="
                f"{self.kid_subset_size}; lower kid_subset_size or num_samples"
            )
        if seen < 2:
            raise ValueError(f"GenerativeMetrics: only {seen} real images; FID/KID need at least 2")

    @staticmethod
    def _to_unit_range(pl_module: L.LightningModule):
        low, high = getattr(pl_module, "value_range", (0.0, 1.0))
        return lambda x: ((x.float() - low) / (high - low)).clamp(0, 1)
