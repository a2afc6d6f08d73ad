"""Variational autoencoder: its objectives (ELBO, IWAE, MIWAE, PIWAE, beta-TC, MMD), likelihoods, class conditioning,
IWAE likelihood."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, Normal, kl_divergence
from typing_extensions import override

from dgm_lightning import objectives
from dgm_lightning.checks import check_non_negative, check_positive_int
from dgm_lightning.compat import attached_trainer
from dgm_lightning.latent_variable import LatentVariableModel
from dgm_lightning.objectives import Kernel, Objective
from dgm_lightning.posteriors import (
    Posterior,
    check_posterior,
    detached,
    latent_log_prob,
    own_prior,
    posterior_code,
    posterior_distribution,
    posterior_out_dim,
    sphere_from_noise,
)
from dgm_lightning.priors import LatentPrior, build_prior
from dgm_lightning.vae_checks import (
    VAEObjective,
    VAEPrior,
    check_objective_settings,
    check_posterior_settings,
    check_prior_settings,
)

# the VAE's settings of its objective and posterior, which a subclass with its own (FlowVAE) does not take
STRATEGY_SETTINGS = (
    "objective", "posterior", "prior", "mixture_components", "pseudo_inputs", "free_bits", "training_samples",
    "miwae_groups", "mi_weight", "dim_kl_weight", "dataset_size", "mmd_weight", "mmd_kernel",
)  # fmt: skip


class VAE(LatentVariableModel):
    """Variational autoencoder whose latent geometry (``posterior``) and objective (``objective``) are options.

    Posteriors: ``gaussian`` (a diagonal Gaussian), or hyperspherical, codes on the unit sphere S^(latent_dim - 1)
    with the uniform prior on it: ``power_spherical`` (rejection-free sampling) or
    ``von_mises_fisher``. ``latent_dim`` is the ambient dimension: 2 is the circle (a von Mises latent). The
    encoder gives the mean direction and, through softplus + 1, the concentration; ``encode`` returns the mean
    direction (on the sphere, where the decoder is trained), and ``sample`` draws from the uniform prior (its
    temperature only scales noise whose direction alone counts, so any temperature > 0 samples the prior and 0
    gives the decoder at e1, a fixed point, as the uniform has no mode).

    Priors of the Gaussian posterior (``prior``): ``standard_normal`` (the closed-form KL), a learned ``mixture`` of
    ``mixture_components`` diagonal Gaussians, or the ``vamp`` prior, the mixture of the posteriors of
    ``pseudo_inputs`` learned pseudo-inputs (``dgm_lightning.priors``). With a learned prior the KL is the Monte
    Carlo estimate log q(z|x) - log p(z) at the posterior's sample, ``log_prob`` uses the same prior, and
    ``sample`` (and ``from_noise``) pick a component by the normal CDF of the noise's first coordinate and draw
    from it with the rest (``noise_shape`` is (latent_dim + 1,)).

    Objectives, each a pure function of ``dgm_lightning.objectives``:

    - ``elbo``: ``-E_q[log p(x|z)] + beta * KL``, the KL floored per dimension by ``free_bits``;
    - ``iwae``: the importance-weighted bound with ``training_samples`` samples per example (K = 1 is the ELBO);
      ``miwae``: the mean of ``miwae_groups`` such bounds over groups of the samples; ``piwae``: the decoder (and a
      learned prior) trained on the iwae bound, the encoder on the miwae one, in one backward pass (it decodes
      the samples twice: once with the encoder held fixed, once with the decoder held fixed);
    - ``beta_tc``: the KL split into index-code MI, total correlation and dimension-wise KL, weighted by
      ``mi_weight``, ``beta`` and ``dim_kl_weight`` (beta-TC-VAE; the aggregate posterior estimated on the batch
      over a training set of ``dataset_size`` examples);
    - ``mmd``: ``-E_q[log p(x|z)] + beta * KL + mmd_weight * MMD(q(z), p(z))`` (InfoVAE; ``beta`` 0 is the
      WAE-MMD), with the ``mmd_kernel`` kernel.

    Every weight is a plain float attribute, so a schedule callback can anneal it. Every objective also logs
    ``elbo``, ``reconstruction`` and ``kl``, so runs with different objectives compare on the same scale. A
    setting that the chosen objective does not use is refused rather than ignored. Validation logs the number of
    active units; test also logs ``test/nll``, the importance-weighted estimate of -log p(x) with ``iwae_samples``
    samples (nats per example), and ``test/bpd``, the same in bits per dimension. Compare bpd across models only
    for the same data space: a Bernoulli likelihood on grey levels is not a density of the discrete images that
    a flow's bpd measures; on binarized data (``binarize: true``) it is.

    Args:
        latent_dim: size of z.
        objective: ``elbo``, ``iwae``, ``miwae``, ``piwae``, ``beta_tc`` or ``mmd`` (see above).
        posterior: ``gaussian``, ``power_spherical`` or ``von_mises_fisher`` (see above); the hyperspherical ones
            take neither free bits (their KL has no per-dimension split) nor ``beta_tc`` (they do not factorise
            over dimensions).
        prior: ``standard_normal``, ``mixture`` or ``vamp`` for the Gaussian posterior, ``uniform`` (on the sphere)
            for the hyperspherical ones; None: the posterior's own (standard normal, uniform). Free bits need the
            standard normal; the vamp prior is not class-conditional.
        mixture_components: components of the ``mixture`` prior.
        pseudo_inputs: pseudo-inputs of the ``vamp`` prior (500 in the paper).
        beta: weight of the KL term (1 gives the ELBO; Higgins et al. 2017); of the total correlation in
            ``beta_tc``.
        free_bits: nats per latent dimension below which the KL is not penalised (0 disables; ``elbo`` only).
        training_samples: importance samples per example of the ``iwae``, ``miwae`` and ``piwae`` objectives.
        miwae_groups: groups the ``miwae`` objective (and ``piwae``'s encoder) splits its samples into (they must
            divide evenly).
        mi_weight: weight of the index-code mutual information in ``beta_tc``.
        dim_kl_weight: weight of the dimension-wise KL in ``beta_tc``.
        dataset_size: examples in the training set, for ``beta_tc``'s estimate of the aggregate posterior; None
            takes it from the Trainer's training data.
        mmd_weight: weight of the MMD in ``mmd``.
        mmd_kernel: ``imq`` (inverse multiquadric) or ``rbf``, with the bandwidth 2 * latent_dim (WAE's rule for a
            standard normal prior).
        iwae_samples: importance samples for ``test/nll``.
        iwae_chunk_size: importance samples decoded at once by ``log_prob`` and ``test/nll``: the evaluation's peak
            memory is that of decoding about ``iwae_chunk_size`` times a batch (the DataModules' ``eval_batch_size``)
            at once, however many samples it takes.
        settings: see ``LatentVariableModel`` (the encoder outputs 2 * latent_dim, mean and log-variance, for the
            Gaussian posterior; latent_dim + 1, direction and concentration, for the hyperspherical ones).

    References: Kingma & Welling 2013, arXiv:1312.6114; conditional VAE, Sohn et al. 2015 (NeurIPS);
        free bits, Kingma et al. 2016, arXiv:1606.04934; IWAE bound, Burda et al. 2015, arXiv:1509.00519;
        MIWAE and PIWAE, Rainforth et al. 2018, arXiv:1802.04537; beta-TC-VAE, Chen et al. 2018, arXiv:1802.04942;
        VampPrior, Tomczak & Welling 2017, arXiv:1705.07120; InfoVAE, Zhao et al. 2017, arXiv:1706.02262;
        WAE, Tolstikhin et al. 2017, arXiv:1711.01558; hyperspherical VAE, Davidson et al. 2018,
        arXiv:1804.00891; Power Spherical, De Cao & Aziz 2020, arXiv:2006.04437.
    """

    def __init__(
        self,
        latent_dim: int = 16,
        *,
        objective: VAEObjective = "elbo",
        posterior: Posterior = "gaussian",
        prior: VAEPrior | None = None,
        mixture_components: int = 10,
        pseudo_inputs: int = 500,
        beta: float = 1.0,
        free_bits: float = 0.0,
        training_samples: int = 1,
        miwae_groups: int = 1,
        mi_weight: float = 1.0,
        dim_kl_weight: float = 1.0,
        dataset_size: int | None = None,
        mmd_weight: float = 10.0,
        mmd_kernel: Kernel = "imq",
        iwae_samples: int = 100,
        iwae_chunk_size: int = 10,
        **settings: Any,
    ) -> None:
        check_posterior(posterior, latent_dim)
        self.posterior_name = posterior  # read by encoder_out_dim while the base class builds the encoder
        # settings: those of LatentVariableModel, declared there once (see AE)
        super().__init__(latent_dim, **settings)
        prior = check_prior_settings(
            prior, posterior=posterior, num_classes=self.num_classes, free_bits=free_bits,
            mixture_components=mixture_components, pseudo_inputs=pseudo_inputs,
        )  # fmt: skip
        check_posterior_settings(posterior, objective=objective, free_bits=free_bits)
        check_objective_settings(
            objective, free_bits=free_bits, training_samples=training_samples, miwae_groups=miwae_groups,
            mi_weight=mi_weight, dim_kl_weight=dim_kl_weight, dataset_size=dataset_size, mmd_weight=mmd_weight,
            mmd_kernel=mmd_kernel,
        )  # fmt: skip
        check_non_negative(beta=beta)
        check_positive_int(iwae_samples=iwae_samples, iwae_chunk_size=iwae_chunk_size)
        self.objective_name = objective  # not self.objective: that is the method
        self.beta, self.free_bits = float(beta), float(free_bits)
        self.mi_weight, self.dim_kl_weight, self.mmd_weight = float(mi_weight), float(dim_kl_weight), float(mmd_weight)
        self.training_samples, self.miwae_groups, self.dataset_size = training_samples, miwae_groups, dataset_size
        self.mmd_kernel = mmd_kernel
        self.iwae_samples, self.iwae_chunk_size = iwae_samples, iwae_chunk_size
        self.register_buffer("prior_loc", torch.zeros(latent_dim))
        self.register_buffer("prior_scale", torch.ones(latent_dim))
        # a learned prior's parameters (the mixture's, the vamp prior's pseudo-inputs); None: the closed-form prior
        self.learned_prior: LatentPrior | None = None
        if prior in ("mixture", "vamp"):
            self.learned_prior = build_prior(
                prior, latent_dim, num_components=mixture_components, num_pseudo_inputs=pseudo_inputs,
                data_shape=self.data_shape, value_range=self.value_range, encode=self.pseudo_input_posteriors,
            )  # fmt: skip

    @property
    def encoder_out_dim(self) -> int:
        return posterior_out_dim(self.posterior_name, self.latent_dim)

    @property
    def spherical(self) -> bool:
        """Whether the codes live on the unit sphere (a hyperspherical posterior)."""
        return self.posterior_name != "gaussian"

    @property
    def prior(self) -> Distribution:
        """p(z): N(prior_loc, prior_scale^2) per dimension (batch shape (latent_dim,)); a learned prior's mixture or
        the uniform distribution on the sphere (event shape (latent_dim,))."""
        if self.learned_prior is not None:
            return self.learned_prior.distribution()
        return own_prior(self.posterior_name, self.prior_loc, self.prior_scale)

    def posterior(self, x: Tensor, *, labels: Tensor | None = None) -> Distribution:
        """q(z | x): a Normal with batch shape (B, latent_dim), or a hyperspherical distribution with batch shape
        (B,) and event shape (latent_dim,)."""
        return posterior_distribution(self.posterior_name, self.encoder_output(x, labels))

    def pseudo_input_posteriors(self, pseudo_inputs: Tensor) -> tuple[Tensor, Tensor]:
        """The vamp prior's components: the Gaussian posteriors' (loc, scale), each (K, latent_dim), of the
        pseudo-inputs (K, *data_shape), through this model's encoder (so a compiled encoder is the one used)."""
        q = self.posterior(pseudo_inputs)
        return q.loc, q.scale

    def kl(self, q: Distribution, z: Tensor) -> Tensor:
        """KL(q(z|x) || p(z)): in closed form per dimension (B, latent_dim) for the standard normal, per example (B,)
        for the sphere; for a learned prior the Monte Carlo estimate log q(z|x) - log p(z) at the sample z (B,)."""
        if self.learned_prior is None:
            return kl_divergence(q, self.prior)
        return latent_log_prob(q, z) - latent_log_prob(self.prior, z)

    def _encode(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Images (B, C, H, W) -> posterior means (B, latent_dim); on the sphere, the mean direction."""
        return posterior_code(self.posterior(x, labels=labels))

    @property
    @override
    def prior_noise_shape(self) -> tuple[int, ...]:
        """Shape of the standard normal noise of one sample from the prior: (latent_dim,), and one more coordinate
        that picks a learned prior's component."""
        return (self.latent_dim + (self.learned_prior is not None),)

    def latent_from_noise(self, noise: Tensor) -> Tensor:
        """z from the prior: prior_loc + prior_scale * noise for the Gaussian; for a learned prior (a mixture of
        diagonal Gaussians) the component whose share of the cumulative weights holds the normal CDF of the first
        coordinate, reparameterised by the rest; for the sphere the noise's direction (uniform on the sphere), and
        e1 for zero noise (temperature 0: the uniform has no mode)."""
        if self.learned_prior is not None:
            mixture = self.prior
            components = mixture.component_distribution.base_dist  # Normal, batch (K, latent_dim)
            cumulative = mixture.mixture_distribution.probs.cumsum(0)
            index = torch.searchsorted(cumulative, torch.special.ndtr(noise[:, 0]).contiguous())
            index = index.clamp(max=cumulative.shape[0] - 1)  # rounding can leave the last cumulative weight < 1
            return components.loc[index] + components.scale[index] * noise[:, 1:]
        if not self.spherical:
            return self.prior_loc + self.prior_scale * noise
        return sphere_from_noise(noise)

    def objective(self, batch: Tensor | Sequence[Tensor]) -> Objective:
        """The chosen objective (``objective``) on a batch: ``loss``, ``elbo``, ``reconstruction``, ``kl`` and the
        objective's own terms; in evaluation also ``mi``, an estimate of I(x; z)."""
        x, labels = self.unpack_batch(batch)
        q = self.posterior(x, labels=labels)
        if self.objective_name in ("iwae", "miwae", "piwae"):
            terms = self.importance_terms(x, labels, q)
        else:
            z = q.rsample()
            terms = self.single_sample_terms(z, q, self.decoder_distribution(z, labels).log_prob(x))
        if not self.training and x.shape[0] > 1 and not self.spherical:  # a diagnostic, in validation and test
            terms.setdefault("mi", objectives.mutual_information(q))  # beta_tc has its own estimate
        return Objective(terms, batch_size=x.shape[0], codes=posterior_code(q).detach())

    def single_sample_terms(self, z: Tensor, q: Normal, reconstruction: Tensor) -> dict[str, Tensor]:
        """The terms of the objectives that take one posterior sample z (B, D) per example: elbo, beta_tc, mmd.

        beta_tc and mmd estimate a distribution of codes from the batch, which a batch of one example does not
        have: such a batch (the last of an epoch, say) trains on the ELBO instead.
        """
        kl = self.kl(q, z)
        if self.objective_name == "elbo" or z.shape[0] < 2:
            return objectives.elbo_terms(reconstruction, kl, beta=self.beta, free_bits=self.free_bits)
        if self.objective_name == "beta_tc":
            return objectives.beta_tc_terms(
                z, q, reconstruction, dataset_size=self.training_set_size(z.shape[0]), alpha=self.mi_weight,
                beta=self.beta, gamma=self.dim_kl_weight, log_pz=self.beta_tc_log_prior(z),
            )  # fmt: skip
        return objectives.mmd_terms(
            z, reconstruction, prior_samples=self.prior.sample((z.shape[0],)), weight=self.mmd_weight, kl=kl,
            kl_weight=self.beta, kernel=self.mmd_kernel,
        )  # fmt: skip

    def beta_tc_log_prior(self, z: Tensor) -> Tensor:
        """log p(z) as beta_tc takes it: per dimension (B, latent_dim) for the standard normal, per example (B,)."""
        prior = self.prior
        return prior.log_prob(z) if isinstance(prior, Normal) else latent_log_prob(prior, z)

    def importance_terms(self, x: Tensor, labels: Tensor | None, q: Normal) -> dict[str, Tensor]:
        """The terms of the iwae, miwae and piwae objectives, from ``training_samples`` posterior samples per example.

        For piwae the log weights are computed twice from the same samples: with the encoder held fixed (samples and
        q detached) for the decoder's and prior's bound, and with the decoder and prior held fixed (detached
        parameters) for the encoder's. The vamp prior is made by the encoder from its pseudo-inputs, so the encoder
        also learns from the generative bound through it.
        """
        z = q.rsample((self.training_samples,))  # (K, B, D)
        if self.objective_name == "iwae":
            return objectives.iwae_terms(*self.log_weights_at(x, labels, z, q, self.prior), beta=self.beta)
        if self.objective_name == "miwae":
            log_weights = self.log_weights_at(x, labels, z, q, self.prior)
            return objectives.miwae_terms(*log_weights, num_groups=self.miwae_groups, beta=self.beta)
        prior = self.prior
        generative = self.log_weights_at(x, labels, z.detach(), detached(q), prior)
        inference = self.log_weights_at(x, labels, z, q, detached(prior), frozen_decoder=True)
        return objectives.piwae_terms(generative, inference, num_groups=self.miwae_groups, beta=self.beta)

    def training_set_size(self, batch_size: int) -> int:
        """N, the examples that beta_tc's aggregate posterior is over: ``dataset_size``, or the size of the
        Trainer's training data (its DataModule's, before the training loop has loaded it: the sanity check)."""
        if self.dataset_size is not None:
            return max(self.dataset_size, batch_size)
        trainer = attached_trainer(self)
        loader = None if trainer is None else trainer.train_dataloader
        if loader is None and trainer is not None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        try:
            return max(len(loader.dataset), batch_size)
        except (AttributeError, TypeError):  # no Trainer, no training data (validate), or a dataset without len
            raise ValueError(
                "the beta_tc objective needs the size of the training set, which it takes from the Trainer's "
                "training data; without them give it: dataset_size=N (--model.dataset_size N)"
            ) from None

    def log_weights(
        self, x: Tensor, labels: Tensor | None, num_samples: int, *, q: Normal | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """log p(x | z_k), log p(z_k) and log q(z_k | x) for ``num_samples`` reparameterised draws z_k from the
        posterior q (computed here unless given), each (num_samples, B)."""
        q = self.posterior(x, labels=labels) if q is None else q
        return self.log_weights_at(x, labels, q.rsample((num_samples,)), q, self.prior)

    def log_weights_at(
        self, x: Tensor, labels: Tensor | None, z: Tensor, q: Distribution, prior: Distribution, *,
        frozen_decoder: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """log p(x | z_k), log p(z_k) and log q(z_k | x), each (K, B), at codes z (K, B, D); ``frozen_decoder``: the
        decoder's parameters detached (``decoder_distribution``)."""
        num_samples = z.shape[0]
        log_q, log_pz = latent_log_prob(q, z), latent_log_prob(prior, z)
        repeated_labels = None if labels is None else labels.repeat(num_samples)
        px = self.decoder_distribution(z.flatten(0, 1), repeated_labels, frozen=frozen_decoder)  # batch (K * B,)
        log_px = px.log_prob(x.repeat(num_samples, *([1] * (x.dim() - 1)))).view(num_samples, -1)
        return log_px, log_pz, log_q

    def log_prob(self, x: Tensor, *, labels: Tensor | None = None, num_samples: int = 100) -> Tensor:
        """Importance-weighted (IWAE) estimate of log p(x) (or log p(x | labels)) in nats, shape (B,), with
        ``num_samples`` posterior samples: a lower bound that tightens as they grow (see ``GenerativeModel``).

        Decodes B * ``iwae_chunk_size`` latents at once.
        """
        check_positive_int(num_samples=num_samples)
        labels = self.check_input(x, labels, "log_prob")
        draw = lambda k: self.log_weights(x, labels, k)  # noqa: E731
        return objectives.iwae_bound(objectives.chunked_log_weights(draw, num_samples, self.iwae_chunk_size))

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
