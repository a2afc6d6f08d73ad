"""What the latent-variable models (AE, VAE, FlowVAE) share: their settings, networks, protocol and steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributions import Distribution
from torchmetrics import CatMetric
from typing_extensions import override

from dgm_lightning import objectives
from dgm_lightning.base import GenerativeModel
from dgm_lightning.checks import check_choice, check_likelihood_range, check_positive, check_positive_int
from dgm_lightning.compat import attached_trainer
from dgm_lightning.fitted_mixture import FittedMixture, mixture_codes
from dgm_lightning.nets import build_decoder, build_encoder
from dgm_lightning.objectives import Likelihood, Objective
from dgm_lightning.optimizers import check_injected

Architecture = Literal["mlp", "conv"]
LatentSampler = Literal["prior", "fitted_mixture"]


class LatentVariableModel(GenerativeModel):
    """What autoencoders and VAEs share: encoder and decoder nets, a named decoder likelihood, conditioning, and the
    settings below, declared here once (the families take their own and pass the rest on by name).

    Subclasses define ``encoder_out_dim``, ``_encode`` (``encode`` without its input checks), ``latent_from_noise``
    and ``objective``.

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
        latent_sampler: where ``sample`` and ``from_noise`` draw codes from: ``prior`` (the VAE's prior, the AE's
            Gaussian fitted to the codes) or ``fitted_mixture``, the Gaussian mixture (``code_mixture``, saved in
            checkpoints) that the callback ``callbacks.FitLatentMixture`` fits to the training codes when training
            ends; its noise has one more coordinate, which picks the component. Until it is fitted, ``sample``
            draws from the prior during a fit (so that image and metric callbacks work) and raises outside one.
        optimizer: builds the optimizer from the parameters (None: Adam with lr 1e-3); on the command line
            ``--model.optimizer AdamW --model.optimizer.lr 3e-4``.
        lr_scheduler: builds a learning-rate scheduler from the optimizer, stepped once per epoch (None: a constant
            rate); e.g. ``--model.lr_scheduler CosineAnnealingLR --model.lr_scheduler.T_max 50``.
        compile: compile the networks with torch.compile when training starts (see ``GenerativeModel``).
        channels_last: channels-last weights and activations in training (see ``GenerativeModel``).
        encoder: your own encoder: (B, C [+ num_classes], H, W) -> (B, encoder_out_dim), where encoder_out_dim is
            latent_dim for the AE and 2 * latent_dim (mean and log-variance) for the VAE.
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
        latent_sampler: LatentSampler = "prior",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        channels_last: bool = True,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        if len(data_shape) != 3:
            raise ValueError(f"data_shape must be three sizes (C, H, W), got {tuple(data_shape)}")
        super().__init__(data_shape=data_shape, value_range=value_range, num_classes=num_classes,
                         compile=compile, channels_last=channels_last)  # fmt: skip
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer", "lr_scheduler"])
        check_positive_int(latent_dim=latent_dim)
        check_positive(gaussian_scale=gaussian_scale)
        check_choice("likelihood", likelihood, Likelihood)
        check_choice("architecture", architecture, Architecture)
        check_choice("latent_sampler", latent_sampler, LatentSampler)
        check_injected(optimizer=optimizer, lr_scheduler=lr_scheduler)
        check_likelihood_range(likelihood, self.value_range)
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.latent_sampler = latent_sampler
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
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
        # always present (unfitted until FitLatentMixture fits it), so that every checkpoint loads into every model
        self.code_mixture = FittedMixture(latent_dim)

    @property
    def encoder_out_dim(self) -> int:
        """Size of the encoder's output per example."""
        raise NotImplementedError

    # -- the protocol callbacks use ---------------------------------------------------------------

    def encode(self, x: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) -> codes (B, latent_dim): the posterior mean (the AE's code), the input checked as
        evaluation batches are."""
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
        """Draw n images (B, C, H, W); ``temperature`` scales the latent noise (0 gives the mode); a conditional
        model draws the classes in turn unless given ``labels``."""
        labels = self.default_labels(n) if labels is None else labels
        return self.from_noise(self.draw_noise(n, temperature), labels=labels)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of the standard normal noise of one sample (``from_noise``): the prior's (``prior_noise_shape``),
        or (latent_dim + 1,) with ``latent_sampler`` fitted_mixture, the first coordinate picking the component."""
        if self.latent_sampler == "fitted_mixture":
            return (self.latent_dim + 1,)
        return self.prior_noise_shape

    @property
    def prior_noise_shape(self) -> tuple[int, ...]:
        """Shape of the noise of one sample that the prior's reparameterisation (``latent_from_noise``) takes."""
        return (self.latent_dim,)

    def from_noise(self, noise: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) from standard normal noise (B, *noise_shape): the decoder mean at the code that the
        noise gives (``codes_from_noise``). ``sample`` scales the noise by its temperature; an exported sampler
        (``dgm_lightning.export``) is this map."""
        labels = self.check_noise(noise, labels)
        return self.decoder_distribution(self.codes_from_noise(noise), labels).mean

    def codes_from_noise(self, noise: Tensor) -> Tensor:
        """Codes (B, latent_dim) from noise (B, *noise_shape) where ``latent_sampler`` says: the prior's
        reparameterisation (``latent_from_noise``) or the fitted mixture's (``mixture_codes``)."""
        if self.latent_sampler == "prior":
            return self.latent_from_noise(noise)
        if self.code_mixture.fitted:
            return mixture_codes(self.code_mixture, noise)
        trainer = attached_trainer(self)
        if trainer is None or trainer.state.fn != "fit":
            raise RuntimeError(
                f"{type(self).__name__} samples from the mixture fitted to its training codes "
                "(latent_sampler='fitted_mixture'), which is not fitted yet: train it with the callback "
                "callbacks.FitLatentMixture (--trainer.callbacks+=callbacks.FitLatentMixture), which fits it when "
                "training ends, or load a checkpoint of such a run; or sample from the prior: "
                "latent_sampler='prior' (--model.latent_sampler prior)"
            )
        # in the fit whose end will fit the mixture (FitLatentMixture): the callbacks that draw samples while it
        # trains get the prior's, from the noise's last coordinates (the first picks a mixture's component)
        return self.latent_from_noise(noise[:, noise.shape[1] - self.prior_noise_shape[0] :])

    def latent_from_noise(self, noise: Tensor) -> Tensor:
        """Codes (B, latent_dim) from standard normal noise (B, *prior_noise_shape): the prior's
        reparameterisation."""
        raise NotImplementedError

    # -- the objective ---------------------------------------------------------------------------

    def objective(self, batch: Tensor | Sequence[Tensor]) -> Objective:
        """The training objective on a batch (images, or images and labels): named terms, ``loss`` minimised, and
        the batch's codes."""
        raise NotImplementedError

    def encoder_output(self, x: Tensor, labels: Tensor | None) -> Tensor:
        out = self.encoder(self.condition_images(x, labels))
        if out.shape != (x.shape[0], self.encoder_out_dim):
            raise ValueError(
                f"the encoder must output shape (B, {self.encoder_out_dim}) for latent_dim={self.latent_dim}, "
                f"got {tuple(out.shape)}"
            )
        return out

    def decoder_distribution(self, z: Tensor, labels: Tensor | None, *, frozen: bool = False) -> Distribution:
        """p(x | z) as a torch distribution over whole images; ``frozen``: with the decoder's parameters (and a learned
        scale) detached, so that its log density passes gradients to z but not to the decoder (PIWAE's encoder term).
        """
        inputs = self.condition_vectors(z, labels)
        log_scale = self.log_scale
        if frozen:
            # functional_call runs the same module on detached copies: no parameter's requires_grad is switched,
            # which would be state shared with DDP's hooks and torch.compile's guards
            detached = {name: tensor.detach() for name, tensor in self.decoder.state_dict(keep_vars=True).items()}
            params, log_scale = torch.func.functional_call(self.decoder, detached, (inputs,)), log_scale.detach()
        else:
            params = self.decoder(inputs)
        if params.shape[1:] != self.data_shape:
            raise ValueError(f"the decoder must output shape (B, {self.data_shape}), got {tuple(params.shape)}")
        return objectives.reconstruction_distribution(self.likelihood, params, log_scale=log_scale)

    # -- Lightning hooks -----------------------------------------------------------------------

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # a checkpoint written before the fitted mixture existed holds none: an unfitted one, so that it loads
        state_dict = checkpoint.get("state_dict", {})
        for name, buffer in self.code_mixture.state_dict(prefix="code_mixture.").items():
            state_dict.setdefault(name, buffer)

    def on_objective(self, objective: Objective, stage: str) -> None:
        if stage == "train":
            self.on_training_codes(objective.codes)
        elif stage == "val":
            self.val_codes.update(objective.codes)

    @override
    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.val_codes.update_called:
            self.on_validation_codes(self.val_codes.compute())
        self.val_codes.reset()

    def on_validation_codes(self, codes: Tensor) -> None:
        """Called with all validation codes (N, latent_dim), gathered across ranks."""

    def on_training_codes(self, codes: Tensor) -> None:
        """Called with the codes (B, latent_dim) of each training batch that is not skipped."""

    @override
    def predict_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """For each input batch: the inputs, their reconstructions and as many fresh samples."""
        x, labels = self.unpack_batch(batch)
        return {
            "inputs": x,
            "reconstructions": self.reconstruct(x, labels=labels),
            "samples": self.sample(x.shape[0], labels=labels),
        }
