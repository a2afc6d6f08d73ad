"""Fit a Gaussian mixture to the training codes of an autoencoder when training ends: a post-hoc sampler."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from dgm_lightning.checks import check_choice, check_positive_int
from dgm_lightning.fitted_mixture import Covariance, FittedMixture


class FitLatentMixture(Callback):
    """When training ends, fit ``pl_module.code_mixture`` (a ``FittedMixture``) to the codes of the training set,
    so that a model with ``latent_sampler: fitted_mixture`` samples codes from it.

    The codes are the model's ``encode`` (posterior means; labels passed for a conditional model) of the batches of
    one epoch of the Trainer's training data (so ``limit_train_batches`` and ``fast_dev_run`` limit them too), in
    eval mode, gathered from all ranks; every rank fits the same mixture from the same seed.
    It runs in ``on_train_end``, after the last epoch's checkpoints: so it saves each ``ModelCheckpoint``'s last
    checkpoint (``save_last``) again, with the fitted mixture. The other checkpoints (the best by a monitored
    metric) hold the weights of an earlier epoch, to which this mixture does not belong, and are left as they are.
    Logs ``fit/latent_mixture_components`` and ``fit/latent_mixture_log_likelihood`` (mean log-density of the
    training codes under the mixture, nats per code).

    Args:
        num_components: Gaussians in the mixture (pythae's default is 10).
        max_codes: fit on at most this many codes (the first ones the training data yields, shuffled in most
            DataModules); None: the whole training set.
        covariance: ``full`` or ``diag`` covariance per component.
        iterations: at most this many EM steps.
        seed: seed of EM's k-means++ start.

    References: Ghosh et al. 2019, arXiv:1903.12436 (ex-post density estimation); Chadebec et al. 2022,
        arXiv:2206.08309 (pythae's GMM sampler).
    """

    def __init__(
        self,
        num_components: int = 10,
        *,
        max_codes: int | None = None,
        covariance: Covariance = "full",
        iterations: int = 100,
        seed: int = 0,
    ) -> None:
        check_positive_int(num_components=num_components, max_codes=max_codes, iterations=iterations)
        check_choice("covariance", covariance, Covariance)
        self.num_components = num_components
        self.max_codes = max_codes
        self.covariance = covariance
        self.iterations = iterations
        self.seed = seed

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(getattr(pl_module, "code_mixture", None), FittedMixture) or not hasattr(pl_module, "encode"):
            raise TypeError(
                f"FitLatentMixture fits a mixture to the codes of a latent-variable model (AE, VAE: one with "
                f"encode and a code_mixture), and {type(pl_module).__name__} has none: remove "
                "callbacks.FitLatentMixture from its callbacks"
            )

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        codes = self.training_codes(trainer, pl_module)
        if codes.shape[0] < self.num_components:
            raise ValueError(
                f"FitLatentMixture: {codes.shape[0]} training codes are too few to fit {self.num_components} "
                "Gaussians: lower num_components, or encode more (limit_train_batches, max_codes)"
            )
        mixture = pl_module.code_mixture.fit(
            codes, self.num_components, iterations=self.iterations, seed=self.seed, covariance=self.covariance
        )
        log_likelihood = mixture.log_prob(codes).mean().item()
        for logger in trainer.loggers:
            metrics = {"fit/latent_mixture_components": mixture.num_components}
            logger.log_metrics({**metrics, "fit/latent_mixture_log_likelihood": log_likelihood}, trainer.global_step)
        rank_zero_info(
            f"FitLatentMixture: fitted {mixture.num_components} Gaussians to {codes.shape[0]} training codes "
            f"(mean log-likelihood {log_likelihood:.4g} nats per code)"
        )
        self.save_last_checkpoints(trainer)

    def training_codes(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor:
        """The codes (N, latent_dim) of the training data, from every rank (at most ``max_codes``)."""
        per_rank = None if self.max_codes is None else math.ceil(self.max_codes / trainer.world_size)
        training = pl_module.training
        pl_module.eval()
        try:
            batches = islice(training_loader(trainer), epoch_batches(trainer))
            codes = encode_all(trainer, pl_module, batches, per_rank)
        finally:
            pl_module.train(training)
        codes = gather_codes(pl_module, codes)
        return codes if self.max_codes is None else codes[: self.max_codes]

    @staticmethod
    def save_last_checkpoints(trainer: L.Trainer) -> None:
        """Write each ModelCheckpoint's last checkpoint again, now with the mixture (``on_train_end`` comes after
        its last save); when checkpoints are written but no last one, say so."""
        paths = [
            (callback.last_model_path, callback.save_weights_only)
            for callback in trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.last_model_path
        ]
        if trainer.checkpoint_callbacks and not paths and not trainer.fast_dev_run:
            rank_zero_warn(
                "FitLatentMixture: no ModelCheckpoint keeps a last checkpoint (save_last), so no checkpoint holds the "
                "fitted mixture; add ModelCheckpoint(save_last=True), or call trainer.save_checkpoint(path)"
            )
        for path, weights_only in paths:
            # save_last="link" makes it a link to a checkpoint of an epoch: replaced by a file, which that is not
            if trainer.is_global_zero and os.path.islink(path):
                os.unlink(path)
            trainer.save_checkpoint(path, weights_only=weights_only)  # every rank calls it; rank zero writes


def training_loader(trainer: L.Trainer) -> Iterable:
    """The Trainer's training data (its DataModule's before the fit loop has loaded it)."""
    loader = trainer.train_dataloader
    if loader is None and trainer.datamodule is not None:
        loader = trainer.datamodule.train_dataloader()
    if loader is None:
        raise ValueError("FitLatentMixture encodes the training data, and the Trainer has none")
    if isinstance(loader, (Mapping, Sequence)):
        raise TypeError(
            f"FitLatentMixture encodes one training dataloader, got a {type(loader).__name__} of them: fit the "
            "mixture yourself, model.code_mixture.fit(codes, num_components)"
        )
    return loader


def epoch_batches(trainer: L.Trainer) -> int | None:
    """The number of batches a training epoch takes (None: all of them)."""
    limit = trainer.num_training_batches
    return None if math.isinf(limit) else int(limit)


@torch.no_grad()
def encode_all(trainer: L.Trainer, pl_module: L.LightningModule, loader: Iterable, limit: int | None) -> Tensor:
    """This rank's codes (n, latent_dim) of the batches of ``loader``, stopping after ``limit`` codes."""
    codes, count = [], 0
    for batch in loader:
        # as the evaluation loop prepares a batch: in the precision, then on the device
        batch = trainer.strategy.batch_to_device(trainer.precision_plugin.convert_input(batch))
        x, labels = pl_module.unpack_batch(batch)
        with trainer.precision_plugin.forward_context():
            codes.append(pl_module.encode(x, labels=labels))
        count += codes[-1].shape[0]
        if limit is not None and count >= limit:
            break
    if not codes:
        raise ValueError("FitLatentMixture: the training data yielded no batches to encode")
    return torch.cat(codes)[:limit]


def gather_codes(pl_module: L.LightningModule, codes: Tensor) -> Tensor:
    """Every rank's codes (N, latent_dim), the same on each rank; ranks may hold different numbers of them."""
    if pl_module.trainer.world_size == 1:
        return codes
    counts = pl_module.all_gather(torch.tensor(codes.shape[0], device=codes.device))  # (world_size,)
    padded = codes.new_zeros(int(counts.max()), codes.shape[1])
    padded[: codes.shape[0]] = codes
    gathered = pl_module.all_gather(padded)  # (world_size, max count, latent_dim)
    return torch.cat([rank_codes[:count] for rank_codes, count in zip(gathered, counts.tolist(), strict=True)])
