"""A small image classifier: the offline feature extractor for FID/KID/IS (see callbacks.GenerativeMetrics)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from dgm_lightning.base import GenerativeModel
from dgm_lightning.checks import check_positive_int
from dgm_lightning.nets import ConvEncoder
from dgm_lightning.objectives import Objective
from dgm_lightning.optimizers import check_injected


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
        hidden_dims: channels of the stride-2 convolutions, one entry per hidden layer.
        optimizer: builds the optimizer from the parameters (None: Adam with lr 1e-3); on the command line
            ``--model.optimizer AdamW --model.optimizer.lr 3e-4``.
        lr_scheduler: builds a learning-rate scheduler from the optimizer, stepped once per epoch (None: a constant
            rate); e.g. ``--model.lr_scheduler CosineAnnealingLR --model.lr_scheduler.T_max 50``.
        compile: compile the networks with torch.compile when training starts (see ``GenerativeModel``).
        channels_last: channels-last weights and activations in training (see ``GenerativeModel``).

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
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        channels_last: bool = True,
    ) -> None:
        super().__init__(data_shape=data_shape, value_range=value_range, num_classes=num_classes,
                         compile=compile, channels_last=channels_last)  # fmt: skip
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        check_positive_int(feature_dim=feature_dim)
        check_injected(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.feature_dim = feature_dim
        self.body = nn.Sequential(ConvEncoder(self.data_shape, feature_dim, hidden_dims), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in value_range -> features (B, feature_dim).

        Only the shape is checked (sync-free): the metrics also feed generated images, which may leave value_range.
        """
        self.check_shape(x, "images")
        return self.body(x)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Images -> class logits (B, num_classes)."""
        return self.head(self.features(x))

    def objective(self, batch) -> Objective:
        """The training objective on a batch of (images, labels): ``loss``, the cross-entropy of the labels, and
        ``accuracy``, the fraction classified right (weighted by batch size, the batches' means give the epoch's)."""
        x, labels = self.unpack_batch(batch)
        logits = self(x)
        terms = {"loss": F.cross_entropy(logits, labels), "accuracy": (logits.argmax(dim=1) == labels).float().mean()}
        return Objective(terms=terms, batch_size=x.shape[0])
