"""VAE whose Gaussian posterior is refined by planar normalizing flows (amortised by the encoder)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor
from torch.distributions import Normal

from dgm_lightning import objectives
from dgm_lightning.checks import check_choice, check_positive_int
from dgm_lightning.nets.flow_layers import planar_flow
from dgm_lightning.objectives import Objective
from dgm_lightning.posteriors import latent_log_prob
from dgm_lightning.vae import STRATEGY_SETTINGS, VAE

# the vamp prior is a mixture of the model's posteriors, which for a FlowVAE have no density in closed form
FlowVAEPrior = Literal["standard_normal", "mixture"]


class FlowVAE(VAE):
    """VAE with a flow posterior: z_0 ~ N(mu(x), sigma(x)), z_K = f_K o ... o f_1(z_0), planar f_k.

    The encoder outputs the Gaussian's mean and log-variance and, after them, the parameters (u, w, b)
    of each of the ``num_flows`` planar flows for this x: ``2 * latent_dim + num_flows * (2 * latent_dim + 1)``
    numbers. log q(z_K | x) = log q_0(z_0 | x) - sum_k log |det df_k/dz|. The metrics are the VAE's
    (``elbo``, ``reconstruction``, ``kl``, ``test/nll`` by IWAE), so the two compare directly; ``kl`` is
    the Monte Carlo estimate log q(z_K | x) - log p(z_K), one sample per example (it has no closed form), so the
    prior can be the VAE's learned ``mixture`` as well as the standard normal.
    With ``num_flows = 0`` the model is a VAE with a Monte Carlo KL: the same ELBO in expectation.
    The invertibility constraint of planar flows moves u by about 1 / |w| when |w| is near 0, so with a very
    small latent_dim (1 or 2) an unlucky initialisation can start with large shifts.

    Args:
        num_flows: number of planar flows K.
        prior: ``standard_normal`` or ``mixture``, a learned mixture of ``mixture_components`` diagonal Gaussians (as
            in ``VAE``; its vamp prior is a mixture of posteriors, which have no closed-form density here).
        mixture_components: components of the ``mixture`` prior.
        beta, iwae_samples, iwae_chunk_size: as in ``VAE``; free bits are not offered, as the Monte Carlo KL has
            no per-dimension split.
        settings: see ``LatentVariableModel``.

    References: Rezende & Mohamed 2015, arXiv:1505.05770; IWAE bound, Burda et al. 2015, arXiv:1509.00519.
    """

    def __init__(
        self, latent_dim: int = 16, *, num_flows: int = 4, prior: FlowVAEPrior = "standard_normal",
        mixture_components: int = 10, beta: float = 1.0, iwae_samples: int = 100, iwae_chunk_size: int = 10,
        **settings: Any,
    ) -> None:  # fmt: skip
        if not isinstance(num_flows, int) or num_flows < 0:
            raise ValueError(f"num_flows must be an integer >= 0, got {num_flows!r}")
        if prior == "vamp":
            raise ValueError(
                "the vamp prior is the mixture of the model's posteriors at its pseudo-inputs, and a FlowVAE's "
                "posterior (planar flows) has no density in closed form there: use prior mixture or standard_normal"
            )
        check_choice("prior", prior, FlowVAEPrior)
        self.num_flows = num_flows  # read by encoder_out_dim while the base class builds the encoder
        # settings: those of LatentVariableModel, declared there once (see AE)
        # its objective is its own ELBO and its posterior its own: the VAE's settings of both are fixed here, so
        # neither Python nor the command line offers them (jsonargparse leaves out of **settings what a call names)
        super().__init__(
            latent_dim, objective="elbo", posterior="gaussian", prior=prior, mixture_components=mixture_components,
            pseudo_inputs=500, beta=beta, free_bits=0.0, training_samples=1,
            miwae_groups=1, mi_weight=1.0, dim_kl_weight=1.0, dataset_size=None, mmd_weight=10.0, mmd_kernel="imq",
            iwae_samples=iwae_samples, iwae_chunk_size=iwae_chunk_size, **settings,
        )  # fmt: skip
        # nor are they hyperparameters of a FlowVAE: dropped, or load_from_checkpoint would pass them back
        for name in set(STRATEGY_SETTINGS) - {"prior", "mixture_components"}:
            self.hparams.pop(name, None)

    @property
    def encoder_out_dim(self) -> int:
        return 2 * self.latent_dim + self.num_flows * (2 * self.latent_dim + 1)

    def posterior_and_flows(self, x: Tensor, *, labels: Tensor | None = None) -> tuple[Normal, Tensor]:
        """q_0(z | x) with batch shape (B, latent_dim), and the flows' parameters (B, num_flows, 2 * latent_dim + 1)."""
        out = self.encoder_output(x, labels)
        d = self.latent_dim
        loc, log_var = out[:, :d], out[:, d : 2 * d]
        q0 = Normal(loc, (0.5 * log_var).exp(), validate_args=False)
        return q0, out[:, 2 * d :].view(x.shape[0], self.num_flows, 2 * d + 1)

    def posterior(self, x: Tensor, *, labels: Tensor | None = None) -> Normal:
        """q_0(z | x), the Gaussian before the flows."""
        return self.posterior_and_flows(x, labels=labels)[0]

    def apply_flows(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """z_0 (..., B, D) -> z_K and the summed log-determinants (..., B)."""
        d = self.latent_dim
        logdet = z.new_zeros(z.shape[:-1])
        for k in range(self.num_flows):
            u, w, b = params[:, k, :d], params[:, k, d : 2 * d], params[:, k, 2 * d :]
            z, ld = planar_flow(z, u, w, b)
            logdet = logdet + ld
        return z, logdet

    def _encode(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Images (B, C, H, W) -> the posterior mean of z_0 pushed through the flows (B, latent_dim)."""
        q0, params = self.posterior_and_flows(x, labels=labels)
        return self.apply_flows(q0.mean, params)[0]

    def log_weights(
        self, x: Tensor, labels: Tensor | None, num_samples: int, *, q0: Normal | None = None,
        params: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """log p(x | z_K), log p(z_K) and log q(z_K | x) for num_samples draws, each (num_samples, B); ``q0`` and
        ``params`` are the encoder's (``posterior_and_flows``), computed here unless given."""
        if q0 is None or params is None:
            q0, params = self.posterior_and_flows(x, labels=labels)
        z0 = q0.rsample((num_samples,))  # (S, B, D)
        z, logdet = self.apply_flows(z0, params)
        log_q = q0.log_prob(z0).sum(-1) - logdet
        log_pz = latent_log_prob(self.prior, z)
        repeated_labels = None if labels is None else labels.repeat(num_samples)
        px = self.decoder_distribution(z.flatten(0, 1), repeated_labels)  # batch (S * B,)
        log_px = px.log_prob(x.repeat(num_samples, *([1] * (x.dim() - 1)))).view(num_samples, -1)
        return log_px, log_pz, log_q

    def objective(self, batch: Tensor | Sequence[Tensor]) -> Objective:
        """The negative ELBO (``loss``, with ``beta``) and its terms, the KL estimated from one sample."""
        x, labels = self.unpack_batch(batch)
        q0, params = self.posterior_and_flows(x, labels=labels)
        log_px, log_pz, log_q = (t[0] for t in self.log_weights(x, labels, 1, q0=q0, params=params))
        # Monte Carlo KL, one sample per example: the flow posterior's KL has no closed form
        terms = objectives.elbo_terms(log_px, log_q - log_pz, beta=self.beta)
        codes = self.apply_flows(q0.mean, params)[0]  # the posterior mean of z_0 pushed through the flows
        return Objective(terms, batch_size=x.shape[0], codes=codes.detach())

    def log_prob(self, x: Tensor, *, labels: Tensor | None = None, num_samples: int = 100) -> Tensor:
        """Importance-weighted (IWAE) estimate of log p(x) (or log p(x | labels)) in nats, shape (B,), sampling the
        flow posterior, ``iwae_chunk_size`` samples at a time; differentiable (see ``GenerativeModel``)."""
        check_positive_int(num_samples=num_samples)
        labels = self.check_input(x, labels, "log_prob")
        draw = lambda k: self.log_weights(x, labels, k)  # noqa: E731
        return objectives.iwae_bound(objectives.chunked_log_weights(draw, num_samples, self.iwae_chunk_size))
