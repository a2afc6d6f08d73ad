"""VQ-VAE: a convolutional encoder to a grid of vectors, vector quantisation, a decoder; codebook health logged."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributions import Distribution
from typing_extensions import override

from dgm_lightning import objectives
from dgm_lightning.base import GenerativeModel
from dgm_lightning.checks import (
    check_choice,
    check_fraction,
    check_likelihood_range,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_temperature,
)
from dgm_lightning.compat import attached_trainer
from dgm_lightning.nets.quantizer import CodebookInit, CodebookUpdate, VectorQuantizer, perplexity
from dgm_lightning.nets.vqvae_nets import GridDecoder, GridEncoder, grid_sizes
from dgm_lightning.objectives import Likelihood, Objective
from dgm_lightning.optimizers import check_injected


class VQVAE(GenerativeModel):
    """Vector-quantised VAE: the encoder's grid of vectors z_e (B, embedding_dim, h, w) is replaced by its nearest
    codes of a codebook of ``num_embeddings`` (``nets.VectorQuantizer``), gradients passed straight through to the
    encoder, and decoded by a named likelihood of the VAE family.

    Objective: ``loss = -log p(x | z_q) + codebook_loss + beta * commitment_loss``, the VQ terms summed over the grid
    (the scale of the log-likelihood, summed over pixels, so that neither vanishes beside the other); with
    ``codebook_update="ema"`` the codebook follows EMA updates instead of its loss. Terms: ``loss``,
    ``reconstruction`` (log p(x | z_q), nats per image), ``commitment``, ``codebook`` (loss updates only),
    ``perplexity`` (of the batch's codes) and ``elbo``, the ELBO under the uniform prior that this first stage is
    trained with: the posterior is one-hot at the nearest codes, so KL = h * w * log K exactly. At each epoch's end
    ``{stage}/codebook_perplexity`` and ``{stage}/codebook_usage`` (the fraction of codes used in the epoch, over all
    ranks) are logged, with a warning when training used less than ``min_codebook_usage`` of the codebook.

    The protocol: ``encode(x)`` gives the quantised grid flattened, (B, latent_dim) with latent_dim =
    embedding_dim * h * w (so that image callbacks interpolate between codes), ``decode`` maps such vectors (quantised
    or not) to decoder means, ``encode_indices`` / ``decode_indices`` the discrete codes (B, h, w). ``sample`` draws
    codes from the uniform prior of this stage (``temperature`` 0: code 0 everywhere, as the uniform has no mode),
    which the decoder was not trained to turn into images: good samples come from the second stage, a learned prior
    over the codes (``dgm_lightning.VQVAEPrior``, trained on this model's checkpoint). ``log_prob`` is the ELBO above.

    Not a ``LatentVariableModel``: that class's code is one flat Gaussian vector (its latent_sampler, its fitted
    mixture with latent_dim^2 covariances, noise reparameterised to codes), which a grid of discrete indices is not.

    Args:
        num_embeddings: codebook size K.
        embedding_dim: size of each code vector.
        data_shape: (C, H, W) of the images.
        value_range: (low, high) of pixel values; the Bernoulli likelihoods need (0, 1).
        hidden_dims: channels of the encoder's stride-2 convolutions (the grid is the image halved len(hidden_dims)
            times); the decoder mirrors them.
        residual_blocks: residual blocks of the encoder and the decoder at the grid's resolution.
        residual_channels: hidden channels of the residual blocks.
        likelihood: ``bernoulli``, ``continuous_bernoulli``, ``gaussian`` or ``gaussian_learned`` (as the VAE's).
        gaussian_scale: standard deviation of the Gaussian likelihoods.
        beta: weight of the commitment loss (0.25 in the paper).
        codebook_update: ``ema`` (Razavi et al.) or ``loss`` (the codebook loss, van den Oord et al.).
        decay: EMA decay of the codebook statistics.
        codebook_init: ``kmeans`` or ``random`` encoder outputs of the first training batch.
        dead_code_threshold: recent assignments per batch (an EMA) below which a code is restarted at an encoder
            output (0: never).
        min_codebook_usage: warn when a training epoch uses fewer than this fraction of the codes (0: never).
        optimizer: builds the optimizer (None: Adam, lr 1e-3).
        lr_scheduler: builds a learning-rate scheduler, stepped once per epoch (None: a constant rate).
        compile: compile the networks when training starts (see ``GenerativeModel``).
        channels_last: channels-last weights and activations in training (see ``GenerativeModel``).
        encoder: your own encoder: (B, C, H, W) -> (B, embedding_dim, h, w).
        decoder: your own decoder: (B, embedding_dim, h, w) -> (B, C, H, W) distribution parameters.

    References: van den Oord et al. 2017, arXiv:1711.00937; Razavi et al. 2019, arXiv:1906.00446.
    """

    def __init__(
        self,
        num_embeddings: int = 128,
        embedding_dim: int = 16,
        *,
        data_shape: Sequence[int] = (1, 28, 28),
        value_range: Sequence[float] = (0.0, 1.0),
        hidden_dims: Sequence[int] = (32, 64),
        residual_blocks: int = 1,
        residual_channels: int = 32,
        likelihood: Likelihood = "bernoulli",
        gaussian_scale: float = 0.1,
        beta: float = 0.25,
        codebook_update: CodebookUpdate = "ema",
        decay: float = 0.99,
        codebook_init: CodebookInit = "kmeans",
        dead_code_threshold: float = 1.0,
        min_codebook_usage: float = 0.1,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        channels_last: bool = True,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        if len(data_shape) != 3:
            raise ValueError(f"data_shape must be three sizes (C, H, W), got {tuple(data_shape)}")
        super().__init__(data_shape=data_shape, value_range=value_range, num_classes=None,
                         compile=compile, channels_last=channels_last)  # fmt: skip
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer", "lr_scheduler"])
        check_positive_int(
            num_embeddings=num_embeddings, embedding_dim=embedding_dim, residual_channels=residual_channels
        )
        check_positive(gaussian_scale=gaussian_scale)
        check_non_negative(beta=beta, residual_blocks=residual_blocks)
        check_fraction(min_codebook_usage=min_codebook_usage)
        check_choice("likelihood", likelihood, Likelihood)
        check_choice("codebook_update", codebook_update, CodebookUpdate)
        check_choice("codebook_init", codebook_init, CodebookInit)
        if num_embeddings < 2:
            raise ValueError(f"num_embeddings must be >= 2 (one code carries no information), got {num_embeddings}")
        check_injected(optimizer=optimizer, lr_scheduler=lr_scheduler)
        check_likelihood_range(likelihood, self.value_range)
        c, h, w = self.data_shape
        self.grid_shape = (grid_sizes(h, len(hidden_dims))[-1], grid_sizes(w, len(hidden_dims))[-1])
        self.likelihood, self.beta = likelihood, float(beta)
        self.min_codebook_usage = float(min_codebook_usage)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        # whether the networks are the defaults, which hparams rebuild (a VQVAEPrior's checkpoint relies on it)
        self.default_networks = encoder is None and decoder is None
        blocks = {"residual_blocks": residual_blocks, "residual_channels": residual_channels}
        self.encoder = GridEncoder(c, embedding_dim, hidden_dims, **blocks) if encoder is None else encoder
        self.quantizer = VectorQuantizer(
            num_embeddings, embedding_dim, update=codebook_update, decay=decay, init=codebook_init,
            dead_code_threshold=dead_code_threshold,
        )  # fmt: skip
        self.decoder = (
            GridDecoder(embedding_dim, self.data_shape, hidden_dims[::-1], **blocks) if decoder is None else decoder
        )
        self.init_log_scale(likelihood, gaussian_scale)
        self._code_counts: dict[str, Tensor] = {}  # per stage: this epoch's uses of each code, on this rank

    @property
    def num_embeddings(self) -> int:
        return self.quantizer.num_embeddings

    @property
    def latent_dim(self) -> int:
        """Size of the flattened quantised grid that ``encode`` returns: embedding_dim * h * w."""
        return self.quantizer.embedding_dim * math.prod(self.grid_shape)

    # -- the networks ----------------------------------------------------------------------------

    def quantize(self, x: Tensor, *, learn: bool = False) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Images (B, C, H, W) -> (quantised grid with straight-through gradients, indices (B, h, w), VQ losses).
        ``learn``: let the batch update the codebook (the training objective does); the public methods (``encode``,
        ``log_prob``, ...) never do, in training mode neither."""
        z = self.encoder(x)
        expected = (x.shape[0], self.quantizer.embedding_dim, *self.grid_shape)
        if tuple(z.shape) != expected:
            raise ValueError(f"the encoder must output shape {expected} (B, embedding_dim, h, w), got {tuple(z.shape)}")
        return self.quantizer(z, learn=learn)

    def decoder_distribution(self, grid: Tensor) -> Distribution:
        """p(x | z) over whole images from a grid of code vectors (B, embedding_dim, h, w)."""
        params = self.decoder(grid)
        if params.shape[1:] != self.data_shape:
            raise ValueError(f"the decoder must output shape (B, {self.data_shape}), got {tuple(params.shape)}")
        return objectives.reconstruction_distribution(self.likelihood, params, log_scale=self.log_scale)

    # -- the protocol ----------------------------------------------------------------------------

    def encode(self, x: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) -> the quantised grid, flattened (B, latent_dim)."""
        self.check_input(x, labels, "encode")
        return self.quantize(x)[0].flatten(1)

    def encode_indices(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> the indices of their codes (B, h, w)."""
        self.check_input(x, None, "encode_indices")
        return self.quantize(x)[1]

    def decode(self, z: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """Flattened grids of code vectors (B, latent_dim) -> decoder means (B, C, H, W)."""
        self.check_codes(z, "decode")
        self.check_labels(labels, z.shape[0])
        return self.decoder_distribution(z.view(-1, self.quantizer.embedding_dim, *self.grid_shape)).mean

    def decode_indices(self, index: Tensor) -> Tensor:
        """Index grids (B, h, w) in [0, num_embeddings) -> decoder means (B, C, H, W)."""
        self.check_indices(index, "decode_indices")
        return self.decoder_distribution(self.quantizer.lookup(index)).mean

    def check_indices(self, index: Tensor, method: str) -> None:
        """Refuse an index grid unless it is (B, h, w) integers in [0, num_embeddings)."""
        if index.dim() != 3 or tuple(index.shape[1:]) != self.grid_shape or index.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} expects code indices of shape (B, {', '.join(map(str, self.grid_shape))}) "
                f"(integers) as the input of {method}, but got {tuple(index.shape)} ({index.dtype})"
            )
        if index.numel() and (index.min() < 0 or index.max() >= self.num_embeddings):
            raise ValueError(f"code indices must lie in [0, {self.num_embeddings}), got {index.min()}..{index.max()}")

    def reconstruct(self, x: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """The decoder mean at the quantised code of x."""
        return self.decode(self.encode(x, labels=labels))

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """n images decoded from codes drawn uniformly, the prior of this first stage (see the class docstring; for
        good samples train ``VQVAEPrior``); ``temperature`` 0 decodes code 0 everywhere."""
        check_positive_int(n=n)
        self.check_labels(labels, n)
        # said once per process (Python shows a repeated warning once): image callbacks and metrics call this too
        rank_zero_warn(
            f"{type(self).__name__}.sample decodes codes drawn uniformly, the prior of this first stage, which the "
            "decoder does not turn into images: for samples, train its prior (dgm_lightning.VQVAEPrior, "
            "configs/vqvae_prior_*.yaml) and sample from that"
        )
        check_temperature(temperature)
        shape = (n, *self.grid_shape)
        if temperature == 0:
            index = torch.zeros(shape, dtype=torch.long, device=self.device)
        else:
            index = torch.randint(0, self.num_embeddings, shape, device=self.device)
        return self.decode_indices(index)

    def log_prob(self, x: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """The ELBO of x under the uniform prior, log p(x | z_q(x)) - h * w * log K in nats, shape (B,): a lower bound
        on log p(x) of this first stage (the posterior is one-hot, so there is no sampling). Differentiable, the
        gradient reaching the encoder straight through."""
        self.check_input(x, labels, "log_prob")
        grid, _, _ = self.quantize(x)
        return self.decoder_distribution(grid).log_prob(x) - self.uniform_prior_kl

    @property
    def uniform_prior_kl(self) -> float:
        """KL(one-hot posterior || uniform prior) of a grid: h * w * log K nats."""
        return math.prod(self.grid_shape) * math.log(self.num_embeddings)

    # -- the objective ---------------------------------------------------------------------------

    def objective(self, batch: Tensor | Sequence[Tensor]) -> Objective:
        """The VQ-VAE's loss on a batch (images, or images and labels, which are ignored) and its terms; the
        Objective's ``codes`` are the batch's code indices (B, h * w)."""
        x, _ = self.unpack_batch(batch)
        grid, index, losses = self.quantize(x, learn=self.training)
        reconstruction = self.decoder_distribution(grid).log_prob(x).mean()
        loss = -reconstruction + self.beta * losses["commitment_loss"]
        terms = {"loss": loss, "reconstruction": reconstruction, "commitment": losses["commitment_loss"]}
        if "codebook_loss" in losses:
            terms["loss"] = loss + losses["codebook_loss"]
            terms["codebook"] = losses["codebook_loss"]
        counts = torch.bincount(index.flatten(), minlength=self.num_embeddings)
        terms["perplexity"] = perplexity(counts)
        terms["elbo"] = reconstruction.detach() - self.uniform_prior_kl
        return Objective(terms, batch_size=x.shape[0], codes=index.flatten(1).detach())

    # -- codebook health -------------------------------------------------------------------------

    @override
    def on_objective(self, objective: Objective, stage: str) -> None:
        counts = torch.bincount(objective.codes.flatten(), minlength=self.num_embeddings)
        self._code_counts[stage] = self._code_counts.get(stage, 0) + counts

    def log_codebook_health(self, stage: str) -> None:
        """Log the epoch's codebook perplexity and usage (over all ranks); warn when training used too few codes."""
        counts = self._code_counts.pop(stage, None)
        trainer = attached_trainer(self)
        if counts is None or trainer is None:
            return
        counts = trainer.strategy.reduce(counts.float(), reduce_op="sum")
        usage = (counts > 0).float().mean()
        values = {f"{stage}/codebook_perplexity": perplexity(counts), f"{stage}/codebook_usage": usage}
        self.log_dict(values, sync_dist=False)  # reduced already: every rank has the same values
        if stage == "train" and float(usage) < self.min_codebook_usage:
            rank_zero_warn(
                f"{type(self).__name__}: the codebook is collapsing: epoch {trainer.current_epoch} used "
                f"{int((counts > 0).sum())} of {self.num_embeddings} codes ({float(usage):.1%}, below "
                f"min_codebook_usage={self.min_codebook_usage}). Restart dead codes (dead_code_threshold > 0), "
                "use codebook_update='ema' and codebook_init='kmeans', lower the learning rate, or use fewer codes"
            )

    @override
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._code_counts.pop("train", None)

    @override
    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log_codebook_health("train")

    @override
    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log_codebook_health("val")

    @override
    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.log_codebook_health("test")

    @override
    def predict_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """For each input batch: the inputs, their reconstructions and code indices, and as many samples (from the
        uniform prior: see ``sample``)."""
        x, _ = self.unpack_batch(batch)
        return {
            "inputs": x,
            "reconstructions": self.reconstruct(x),
            "codes": self.encode_indices(x),
            "samples": self.sample(x.shape[0]),
        }


def vqvae_settings(model: VQVAE) -> dict[str, Any]:
    """The settings that rebuild the model's networks (its hparams without LightningCLI's ``_`` entries)."""
    return {key: value for key, value in model.hparams.items() if not key.startswith("_")}
