"""Variational autoencoder: beta weight, free bits, named likelihoods, class conditioning, IWAE likelihood."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Normal
from typing_extensions import override

from dgm_lightning import objectives
from dgm_lightning.checks import check_non_negative, check_positive_int
from dgm_lightning.latent_variable import LatentVariableModel
from dgm_lightning.objectives import Objective


class VAE(LatentVariableModel):
    """Variational autoencoder with a Gaussian posterior and a standard normal prior.

    The training loss is ``-E_q[log p(x|z)] + beta * KL`` where the KL may be floored per dimension
    (free bits). ``beta`` and ``free_bits`` are plain float attributes, so a schedule callback can
    anneal them. Validation logs the ELBO, its terms and the number of active units; test also logs
    ``test/nll``, the importance-weighted estimate of -log p(x) with ``iwae_samples`` samples (nats per
    example), and ``test/bpd``, the same in bits per dimension. Compare bpd across models only for the
    same data space: a Bernoulli likelihood on grey levels is not a density of the discrete images that a
    flow's bpd measures; on binarized data (``binarize: true``) it is.

    Args:
        latent_dim: size of z.
        beta: weight of the KL term (1 gives the ELBO; Higgins et al. 2017).
        free_bits: nats per latent dimension below which the KL is not penalised (0 disables).
        iwae_samples: importance samples for ``test/nll``.
        settings: see ``LatentVariableModel`` (the encoder outputs 2 * latent_dim: mean and log-variance).

    References: Kingma & Welling 2013, arXiv:1312.6114; conditional VAE, Sohn et al. 2015 (NeurIPS);
        free bits, Kingma et al. 2016, arXiv:1606.04934; IWAE bound, Burda et al. 2015, arXiv:1509.00519.
    """

    def __init__(
        self, latent_dim: int = 16, *, beta: float = 1.0, free_bits: float = 0.0, iwae_samples: int = 100,
        **settings: Any,
    ) -> None:  # fmt: skip
        # settings: those of LatentVariableModel, declared there once (see AE)
        super().__init__(latent_dim, **settings)
        check_non_negative(beta=beta, free_bits=free_bits)
        check_positive_int(iwae_samples=iwae_samples)
        self.beta = float(beta)
        self.free_bits = float(free_bits)
        self.iwae_samples = iwae_samples
        self.register_buffer("prior_loc", torch.zeros(latent_dim))
        self.register_buffer("prior_scale", torch.ones(latent_dim))

    @property
    def encoder_out_dim(self) -> int:
        return 2 * self.latent_dim

    @property
    def prior(self) -> Normal:
        return Normal(self.prior_loc, self.prior_scale, validate_args=False)

    def posterior(self, x: Tensor, *, labels: Tensor | None = None) -> Normal:
        """q(z | x) with batch shape (B, latent_dim)."""
        loc, log_var = self.encoder_output(x, labels).chunk(2, dim=1)
        # validate_args=False: non-finite values are the divergence policy's to report, not a crash here
        return Normal(loc, (0.5 * log_var).exp(), validate_args=False)

    def _encode(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Images (B, C, H, W) -> posterior means (B, latent_dim)."""
        return self.posterior(x, labels=labels).mean

    def latent_from_noise(self, noise: Tensor) -> Tensor:
        """z from the prior N(prior_loc, prior_scale^2): prior_loc + prior_scale * noise."""
        return self.prior_loc + self.prior_scale * noise

    def objective(self, batch: Tensor | Sequence[Tensor]) -> Objective:
        """The negative ELBO (``loss``, with ``beta`` and ``free_bits``), its terms, and in evaluation ``mi``."""
        x, labels = self.unpack_batch(batch)
        q = self.posterior(x, labels=labels)
        reconstruction = self.decoder_distribution(q.rsample(), labels).log_prob(x)  # (B,)
        kl = objectives.gaussian_kl(q, self.prior)  # (B, latent_dim)
        terms = objectives.elbo_terms(reconstruction, kl, beta=self.beta, free_bits=self.free_bits)
        if not self.training and x.shape[0] > 1:  # a diagnostic, in validation and test
            terms["mi"] = objectives.mutual_information(q)
        return Objective(terms, batch_size=x.shape[0], codes=q.mean.detach())

    def log_prob(self, x: Tensor, *, labels: Tensor | None = None, num_samples: int = 100) -> Tensor:
        """Importance-weighted (IWAE) estimate of log p(x) (or log p(x | labels)) in nats, shape (B,), with
        ``num_samples`` posterior samples: a lower bound that tightens as they grow (see ``GenerativeModel``).

        Decodes B * num_samples latents at once; lower ``num_samples`` or the batch size if memory is short.
        """
        check_positive_int(num_samples=num_samples)
        labels = self.check_input(x, labels, "log_prob")
        q = self.posterior(x, labels=labels)
        z = q.rsample((num_samples,))  # (K, B, D); reparameterised, so the estimate is differentiable
        log_q = q.log_prob(z).sum(-1)
        log_pz = self.prior.log_prob(z).sum(-1)
        repeated_labels = None if labels is None else labels.repeat(num_samples)
        px = self.decoder_distribution(z.flatten(0, 1), repeated_labels)  # batch (K * B,)
        log_px = px.log_prob(x.repeat(num_samples, 1, 1, 1)).view(num_samples, -1)
        return objectives.iwae_bound(log_px + log_pz - log_q)

    @override
    def test_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        x, labels = self.unpack_batch(batch)
        nll = -self.log_prob(x, labels=labels, num_samples=self.iwae_samples).mean()
        bpd = objectives.bits_per_dim(nll, math.prod(self.data_shape))
        self.log_terms({"nll": nll, "bpd": bpd}, "test", batch_size=x.shape[0])

    def on_validation_codes(self, codes: Tensor) -> None:
        # codes are already gathered from all ranks, so every rank logs the same value
        self.log("val/active_units", objectives.active_units(codes).float(), sync_dist=True)
