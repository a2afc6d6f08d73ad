"""A small image classifier: the offline feature extractor for FID/KID/IS (see callbacks.GenerativeMetrics)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dgm_lightning.base import GenerativeModel
from dgm_lightning.checks import check_positive
from dgm_lightning.nets import ConvEncoder


class Classifier(GenerativeModel):
    """Convolutional classifier whose penultimate layer gives features for generative metrics.

    Inception weights cannot always be had (offline clusters, small or grey images); a classifier trained
    on the same data gives features that separate its classes, which is what FID/KID compare and what IS
    scores. Train it like any model (``python train.py fit --config configs/classifier_digits.yaml``) and
    pass its checkpoint to ``GenerativeMetrics(classifier_checkpoint=...)``.

    Args:
        num_classes: number of classes.
        data_shape: (C, H, W) of the images.
        value_range: (low, high) of pixel values.
        feature_dim: size of the penultimate layer (the features).
        hidden_dims: channels of the stride-2 convolutions.
        lr: Adam learning rate.
        compile: compile the networks with torch.compile when training starts (see ``GenerativeModel``).

    References: features of a domain classifier for FID-like scores, e.g. Lucic et al. 2018, arXiv:1711.10337.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        data_shape: Sequence[int] = (1, 28, 28),
        value_range: Sequence[float] = (0.0, 1.0),
        feature_dim: int = 128,
        hidden_dims: Sequence[int] = (32, 64, 128),
        lr: float = 1e-3,
        compile: bool = False,
    ) -> None:
        super().__init__(data_shape=data_shape, value_range=value_range, num_classes=num_classes, compile=compile)
        self.save_hyperparameters()
        check_positive(feature_dim=feature_dim, lr=lr)
        self.lr = lr
        self.feature_dim = feature_dim
        self.body = nn.Sequential(ConvEncoder(self.data_shape, feature_dim, hidden_dims), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in value_range -> features (B, feature_dim).

        Only the shape is checked (sync-free): the metrics also feed generated images, which may leave value_range.
        """
        self.check_shape(x, "images")
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images -> class logits (B, num_classes)."""
        return self.head(self.features(x))

    def _shared_step(self, batch, stage: str) -> Tensor | None:
        x, labels = self.unpack_batch(batch)
        logits = self(x)
        loss = F.cross_entropy(logits, labels)
        if stage == "train" and self.skip_nonfinite({"loss": loss}):
            return None
        # the batch accuracies' mean weighted by batch size (log_terms) is the epoch's accuracy
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log_terms({"loss": loss, "accuracy": accuracy}, stage, batch_size=x.shape[0])
        return loss

    def training_step(self, batch, batch_idx: int) -> Tensor | None:
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
