"""The deterministic autoencoder, sampled from a Gaussian fitted to the codes of the data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal
from torch.nn import functional as F
from typing_extensions import override

from dgm_lightning.latent_variable import LatentVariableModel
from dgm_lightning.objectives import Objective


class AE(LatentVariableModel):
    """Autoencoder whose reconstruction loss is the negative log-likelihood of a named decoder distribution.

    A plain autoencoder has no prior, so ``sample`` draws codes from a Gaussian fitted to the codes of the data
    (ex-post density estimation): to the validation codes after each validation epoch; in a fit without
    validation (no validation data, or ``limit_val_batches: 0``), to the codes of each training epoch, gathered
    while it trains (so from weights that change over the epoch), until a validation runs. Either way the
    statistics are reduced over all ranks and the fit is saved in checkpoints. Before any fit it is N(0, I).

    Args:
        latent_dim: size of the code.
        settings: see ``LatentVariableModel``.

    References: Ghosh et al. 2019, arXiv:1903.12436 (ex-post density estimation).
    """

    def __init__(self, latent_dim: int = 16, **settings: Any) -> None:
        # settings: those of LatentVariableModel, declared there once; a misspelt one fails there (TypeError), and
        # the command line reads them from there, with their documentation (jsonargparse follows **settings)
        super().__init__(latent_dim, **settings)
        self.register_buffer("code_mean", torch.zeros(latent_dim))
        self.register_buffer("code_scale_tril", torch.eye(latent_dim))
        # this epoch's training codes c, shifted by code_mean for precision, as sums of [c, 1]^T [c, 1]: the sums of
        # outer products, of codes (last column) and their count (last entry); None while validation provides codes
        self._training_moments: Tensor | None = None
        self._validated = False  # whether this fit has run a validation epoch (the sanity check counts)

    @property
    def encoder_out_dim(self) -> int:
        return self.latent_dim

    def _encode(self, x: Tensor, labels: Tensor | None) -> Tensor:
        return self.encoder_output(x, labels)

    def latent_from_noise(self, noise: Tensor) -> Tensor:
        """Codes from the Gaussian fitted to the codes of the data."""
        return self.code_mean + noise @ self.code_scale_tril.T

    def objective(self, batch: Tensor | Sequence[Tensor]) -> Objective:
        """The negative log-likelihood of the batch under the decoder at its codes (``loss``), and its opposite
        (``reconstruction``)."""
        x, labels = self.unpack_batch(batch)
        codes = self._encode(x, labels)
        reconstruction = self.decoder_distribution(codes, labels).log_prob(x).mean()
        terms = {"loss": -reconstruction, "reconstruction": reconstruction}
        return Objective(terms, batch_size=x.shape[0], codes=codes.detach())

    def on_validation_codes(self, codes: Tensor) -> None:
        """Fit the sampling Gaussian to the validation codes."""
        self._validated = True
        self.fit_code_gaussian(codes.mean(0), torch.atleast_2d(torch.cov(codes.T)))

    def fit_code_gaussian(self, mean: Tensor, cov: Tensor) -> None:
        """Set the sampling Gaussian to N(mean, cov)."""
        self.code_mean.copy_(mean)
        # jitter keeps the covariance positive definite when N is small or codes are degenerate
        cov = cov + 1e-4 * torch.eye(self.latent_dim, device=cov.device)
        self.code_scale_tril.copy_(MultivariateNormal(self.code_mean, covariance_matrix=cov).scale_tril)

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._validated = False

    @override
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        d = self.latent_dim + 1
        # at least float32, which counts exactly up to 2**24 examples an epoch (half precision would stop at 2**8)
        dtype = torch.promote_types(self.code_mean.dtype, torch.float32)
        self._training_moments = None if self._validated else torch.zeros(d, d, device=self.device, dtype=dtype)

    def on_training_codes(self, codes: Tensor) -> None:
        # a few small tensor operations per step, and only in a fit without validation
        if self._training_moments is not None:
            moments = self._training_moments
            shifted = F.pad(codes.detach().to(moments.dtype) - self.code_mean, (0, 1), value=1.0)  # (B, D + 1)
            moments.addmm_(shifted.T, shifted)

    @override
    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # the epoch's validation (it runs before this hook) has fitted the Gaussian already, if there was one
        if self._training_moments is None or self._validated:
            return
        # summed over ranks: every rank has the same moments then, so every rank makes the same fit
        moments = self.trainer.strategy.reduce(self._training_moments, reduce_op="sum").cpu().double()
        self._training_moments = None
        n, d = moments[-1, -1], self.latent_dim
        if n < 2:  # every step skipped, or a single example: nothing to fit
            return
        mean = moments[:d, -1] / n  # of the shifted codes
        cov = (moments[:d, :d] - n * torch.outer(mean, mean)) / (n - 1)
        shift = self.code_mean.cpu().double()
        self.fit_code_gaussian((shift + mean).to(self.code_mean), cov.to(self.code_mean))
