"""Autoencoders: the latent-variable base shared with the VAE, and the deterministic AE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, MultivariateNormal
from torch.nn import functional as F
from torchmetrics import CatMetric

from dgm_lightning import objectives
from dgm_lightning.base import GenerativeModel
from dgm_lightning.checks import check_positive
from dgm_lightning.nets import build_decoder, build_encoder

Likelihood = Literal["bernoulli", "continuous_bernoulli", "gaussian", "gaussian_learned"]
Architecture = Literal["mlp", "conv"]


class LatentVariableModel(GenerativeModel):
    """What autoencoders and VAEs share: encoder and decoder nets, a named decoder likelihood, conditioning.

    Subclasses define ``encoder_out_dim``, ``_encode`` (``encode`` without its input checks), ``latent_from_noise``
    and ``loss_terms``.

    Args:
        latent_dim: size of the code.
        data_shape: (C, H, W) of the images.
        value_range: (low, high) of pixel values; the Bernoulli likelihoods need (0, 1).
        architecture: default networks, ``mlp`` or ``conv`` (ignored for injected networks).
        hidden_dims: hidden sizes (mlp) or channels (conv) of the default encoder; the decoder mirrors them.
        likelihood: ``bernoulli``, ``continuous_bernoulli``, ``gaussian`` (fixed scale ``gaussian_scale``)
            or ``gaussian_learned`` (one learned scale, initialised at ``gaussian_scale``).
        gaussian_scale: standard deviation of the Gaussian likelihoods.
        num_classes: condition encoder and decoder on labels (one-hot) when set.
        lr: Adam learning rate (``--optimizer`` on the CLI replaces the optimizer).
        compile: compile the networks with torch.compile when training starts (see ``GenerativeModel``).
        encoder: your own encoder: (B, C [+ num_classes], H, W) -> (B, latent_dim).
        decoder: your own decoder: (B, latent_dim [+ num_classes]) -> (B, C, H, W) distribution parameters
            (logits for the Bernoullis, means for the Gaussians).
    """

    def __init__(
        self,
        latent_dim: int = 16,
        *,
        data_shape: Sequence[int] = (1, 28, 28),
        value_range: Sequence[float] = (0.0, 1.0),
        architecture: Architecture = "mlp",
        hidden_dims: Sequence[int] | None = None,
        likelihood: Likelihood = "bernoulli",
        gaussian_scale: float = 0.1,
        num_classes: int | None = None,
        lr: float = 1e-3,
        compile: bool = False,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        if len(data_shape) != 3:
            raise ValueError(f"data_shape must be three sizes (C, H, W), got {tuple(data_shape)}")
        super().__init__(data_shape=data_shape, value_range=value_range, num_classes=num_classes, compile=compile)
        self.save_hyperparameters(ignore=["encoder", "decoder"])
        if not isinstance(latent_dim, int) or latent_dim <= 0:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        check_positive(gaussian_scale=gaussian_scale, lr=lr)
        objectives.check_choice("likelihood", likelihood, objectives.LIKELIHOODS)
        if likelihood in ("bernoulli", "continuous_bernoulli") and self.value_range != (0.0, 1.0):
            raise ValueError(
                f"the {likelihood} likelihood models pixels in (0, 1) but value_range is {self.value_range}; "
                "use value_range (0, 1) or a gaussian likelihood"
            )
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.lr = lr
        cond = num_classes or 0
        c, h, w = self.data_shape
        if encoder is None:
            encoder = build_encoder(architecture, (c + cond, h, w), self.encoder_out_dim, hidden_dims)
        if decoder is None:
            decoder = build_decoder(architecture, latent_dim + cond, self.data_shape, hidden_dims)
        self.encoder, self.decoder = encoder, decoder
        self.init_log_scale(likelihood, gaussian_scale)
        # codes (posterior means) of the validation set, gathered across ranks at epoch end
        self.val_codes = CatMetric()

    @property
    def encoder_out_dim(self) -> int:
        """Size of the encoder's output per example."""
        raise NotImplementedError

    # -- the protocol callbacks use ---------------------------------------------------------------

    def encode(self, x: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) -> codes (B, latent_dim), the input checked as training batches are."""
        labels = self.check_input(x, labels, "encode")
        return self._encode(x, labels)

    def _encode(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """``encode`` without the input checks: for batches that ``unpack_batch`` has checked."""
        raise NotImplementedError

    def decode(self, z: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """Codes (B, latent_dim) -> images (B, C, H, W): the mean of the decoder distribution."""
        self.check_codes(z, "decode")
        labels = self.check_labels(labels, z.shape[0])
        return self.decoder_distribution(z, labels).mean

    def reconstruct(self, x: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """Decode the code of x (the posterior mean for a VAE)."""
        labels = self.check_labels(labels, x.shape[0])
        return self.decode(self.encode(x, labels=labels), labels=labels)

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """Draw n images (B, C, H, W); ``temperature`` scales the latent noise (0 gives the mode)."""
        labels = self.default_labels(n) if labels is None else labels
        return self.from_noise(self.draw_noise(n, temperature), labels=labels)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of the standard normal noise of one sample (``from_noise``): (latent_dim,)."""
        return (self.latent_dim,)

    def from_noise(self, noise: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) from standard normal noise (B, latent_dim): the decoder mean at the code that the
        noise gives (``latent_from_noise``). ``sample`` scales the noise by its temperature; an exported sampler
        (``dgm_lightning.export``) is this map."""
        labels = self.check_noise(noise, labels)
        return self.decoder_distribution(self.latent_from_noise(noise), labels).mean

    def latent_from_noise(self, noise: Tensor) -> Tensor:
        """Codes (B, latent_dim) from standard normal noise (B, latent_dim): the prior's reparameterisation."""
        raise NotImplementedError

    # -- internals ---------------------------------------------------------------------------

    def encoder_output(self, x: Tensor, labels: Tensor | None) -> Tensor:
        out = self.encoder(self.condition_images(x, labels))
        if out.shape != (x.shape[0], self.encoder_out_dim):
            raise ValueError(
                f"the encoder must output shape (B, {self.encoder_out_dim}) for latent_dim={self.latent_dim}, "
                f"got {tuple(out.shape)}"
            )
        return out

    def decoder_distribution(self, z: Tensor, labels: Tensor | None) -> Distribution:
        """p(x | z) as a torch distribution over whole images."""
        params = self.decoder(self.condition_vectors(z, labels))
        if params.shape[1:] != self.data_shape:
            raise ValueError(f"the decoder must output shape (B, {self.data_shape}), got {tuple(params.shape)}")
        return objectives.reconstruction_distribution(self.likelihood, params, log_scale=self.log_scale)

    def loss_terms(self, x: Tensor, labels: Tensor | None) -> tuple[dict[str, Tensor], Tensor]:
        """Named scalar terms of the objective (``loss`` is minimised) and the codes of x."""
        raise NotImplementedError

    def value_range_advice(self) -> str:
        if self.likelihood in ("bernoulli", "continuous_bernoulli"):
            return (
                f"the {self.likelihood} likelihood models values in (0, 1): map the data into (0, 1), or use a "
                'gaussian likelihood with the range of the data (likelihood="gaussian", value_range=(low, high) in '
                'Python; --model.likelihood gaussian --model.value_range "[low, high]" on the command line)'
            )
        return super().value_range_advice()

    def _shared_step(self, batch, stage: str) -> dict[str, Tensor] | None:
        """Compute and log the loss terms; None for a training step skipped by the divergence policy."""
        x, labels = self.unpack_batch(batch)
        terms, codes = self.loss_terms(x, labels)
        if stage == "train" and self.skip_nonfinite(terms):
            return None
        self.log_terms(terms, stage, batch_size=x.shape[0])
        if stage == "val":
            self.val_codes.update(codes.detach())
        elif stage == "train":
            self.on_training_codes(codes)
        return terms

    # -- Lightning hooks -----------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> Tensor | None:
        terms = self._shared_step(batch, "train")
        return None if terms is None else terms["loss"]  # None: Lightning skips the optimizer step

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.val_codes.update_called:
            self.on_validation_codes(self.val_codes.compute())
        self.val_codes.reset()

    def on_validation_codes(self, codes: Tensor) -> None:
        """Called with all validation codes (N, latent_dim), gathered across ranks."""

    def on_training_codes(self, codes: Tensor) -> None:
        """Called with the codes (B, latent_dim) of each training batch that is not skipped."""

    def predict_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        """For each input batch: the inputs, their reconstructions and as many fresh samples."""
        x, labels = self.unpack_batch(batch)
        return {
            "inputs": x,
            "reconstructions": self.reconstruct(x, labels=labels),
            "samples": self.sample(x.shape[0], labels=labels),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class AE(LatentVariableModel):
    """Autoencoder whose reconstruction loss is the negative log-likelihood of a named decoder distribution.

    A plain autoencoder has no prior, so ``sample`` draws codes from a Gaussian fitted to the codes of the data
    (ex-post density estimation): to the validation codes after each validation epoch; in a fit without
    validation (no validation data, or ``limit_val_batches: 0``), to the codes of each training epoch, gathered
    while it trains (so from weights that change over the epoch), until a validation runs. Either way the
    statistics are reduced over all ranks and the fit is saved in checkpoints. Before any fit it is N(0, I).

    Args: see ``LatentVariableModel``.

    References: Ghosh et al. 2019, arXiv:1903.12436 (ex-post density estimation).
    """

    def __init__(
        self,
        latent_dim: int = 16,
        *,
        data_shape: Sequence[int] = (1, 28, 28),
        value_range: Sequence[float] = (0.0, 1.0),
        architecture: Architecture = "mlp",
        hidden_dims: Sequence[int] | None = None,
        likelihood: Likelihood = "bernoulli",
        gaussian_scale: float = 0.1,
        num_classes: int | None = None,
        lr: float = 1e-3,
        compile: bool = False,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        super().__init__(
            latent_dim, data_shape=data_shape, value_range=value_range, architecture=architecture,
            hidden_dims=hidden_dims, likelihood=likelihood, gaussian_scale=gaussian_scale,
            num_classes=num_classes, lr=lr, compile=compile, encoder=encoder, decoder=decoder,
        )  # fmt: skip
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

    def loss_terms(self, x: Tensor, labels: Tensor | None) -> tuple[dict[str, Tensor], Tensor]:
        codes = self._encode(x, labels)
        reconstruction = self.decoder_distribution(codes, labels).log_prob(x).mean()
        return {"loss": -reconstruction, "reconstruction": reconstruction}, codes

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

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._validated = False

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
