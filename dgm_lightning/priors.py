"""Priors p(z) of the latent-variable models: standard normal, a learned Gaussian mixture, the VampPrior. (The Gaussian
mixture fitted to training codes after training, a post-hoc sampler, is ``dgm_lightning.fitted_mixture``.)

Each prior is a small ``nn.Module`` whose ``distribution()`` (also its ``forward()``) returns a
``torch.distributions.Distribution`` over codes with event shape (latent_dim,): ``log_prob(z)`` takes z of shape
(..., latent_dim) and returns (...), ``sample((n,))`` returns (n, latent_dim). A model calls ``distribution()`` once
per step and uses the result for every term of that step (the VampPrior runs the encoder on its pseudo-inputs each
time it is called). Only the standard normal has a closed-form KL to a diagonal Gaussian posterior
(``closed_form_kl``); for the others the KL is the Monte Carlo estimate ``log q(z|x) - log p(z)`` at the posterior
sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from dgm_lightning.checks import check_choice, check_positive_int

Prior = Literal["standard_normal", "mixture", "vamp"]

# the VampPrior's encoder: inputs (K, *data_shape) -> posterior loc and scale, each (K, latent_dim)
Encode = Callable[[Tensor], tuple[Tensor, Tensor]]


class LatentPrior(nn.Module):
    """A prior over codes of size ``latent_dim``; subclasses define ``distribution``.

    Args:
        latent_dim: size of z.
    """

    # whether KL(q || p) has a closed form for a diagonal Gaussian posterior q (else: a Monte Carlo estimate)
    closed_form_kl: ClassVar[bool] = False

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        check_positive_int(latent_dim=latent_dim)
        self.latent_dim = latent_dim

    def distribution(self) -> Distribution:
        """p(z) as a torch distribution with event shape (latent_dim,)."""
        raise NotImplementedError

    def forward(self) -> Distribution:
        return self.distribution()

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) in nats: codes (..., latent_dim) -> (...)."""
        check_codes(z, self.latent_dim, "log_prob")
        return self.distribution().log_prob(z)

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        """Codes of shape (*sample_shape, latent_dim) drawn from p(z) (not reparameterised)."""
        return self.distribution().sample(torch.Size(sample_shape))


class StandardNormalPrior(LatentPrior):
    """N(0, I), held in buffers so that it moves with the model; ``distribution().base_dist`` is the per-dimension
    Normal (batch shape (latent_dim,)) that a per-dimension KL (free bits) needs.

    Args:
        latent_dim: size of z.
    """

    closed_form_kl: ClassVar[bool] = True

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def distribution(self) -> Independent:
        # validate_args=False: non-finite values are the divergence policy's to report, not a crash here
        return Independent(Normal(self.loc, self.scale, validate_args=False), 1, validate_args=False)


class MixturePrior(LatentPrior):
    """A learned mixture of ``num_components`` diagonal Gaussians: learned logits (uniform weights at the start),
    means (drawn from N(0, I) at construction, so spread out and set by the global seed) and log-scales (0 at the
    start). Its KL to a posterior has no closed form.

    Args:
        latent_dim: size of z.
        num_components: Gaussians in the mixture.

    References: Dilokthanakul et al. 2016, arXiv:1611.02648 (a Gaussian-mixture prior in a VAE).
    """

    def __init__(self, latent_dim: int, num_components: int) -> None:
        super().__init__(latent_dim)
        check_positive_int(num_components=num_components)
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.loc = nn.Parameter(torch.randn(num_components, latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(num_components, latent_dim))

    def distribution(self) -> MixtureSameFamily:
        components = Independent(Normal(self.loc, self.log_scale.exp(), validate_args=False), 1, validate_args=False)
        return MixtureSameFamily(Categorical(logits=self.logits, validate_args=False), components, validate_args=False)


class VampPrior(LatentPrior):
    """The VampPrior: the uniform mixture of the posteriors q(z | u_k) of K learned pseudo-inputs u_k.

    The encoder is the model's, passed as ``encode``, and not owned here: the pseudo-inputs are this prior's only
    parameters (its only entry in a state_dict), and ``log_prob`` is differentiable in them and, through them, in
    the encoder's weights, so the encoder learns from the prior term as well. Pass a function that calls the
    model's encoder at call time (e.g. a bound method), so that a compiled or replaced encoder is the one used; an
    ``nn.Module`` given as ``encode`` is not registered as a submodule either. Each call of ``distribution`` encodes
    the K pseudo-inputs once, so an encoder with batch norm would also update its statistics with them.

    The pseudo-inputs stay inside ``value_range``: they are ``low + (high - low) * sigmoid(pseudo_logits)``, a
    smooth map whose gradient never vanishes exactly (a hard clamp would freeze a pseudo-input that reaches a bound).
    Unconditional only: a class-conditional model is refused by ``check_prior_supports``.

    Args:
        latent_dim: size of z.
        num_pseudo_inputs: K, the number of pseudo-inputs (components).
        data_shape: shape of one input, e.g. (C, H, W).
        encode: inputs (K, *data_shape) -> posterior (loc, scale), each (K, latent_dim).
        value_range: (low, high) of the data's values, the range the pseudo-inputs stay in.
        init: ``"uniform"`` (uniform in value_range, set by the global seed) or a tensor (K, *data_shape) of
            training examples inside value_range (e.g. a random batch, the paper's choice).

    References: Tomczak & Welling 2017, arXiv:1705.07120.
    """

    def __init__(
        self,
        latent_dim: int,
        num_pseudo_inputs: int,
        data_shape: Sequence[int],
        encode: Encode,
        *,
        value_range: Sequence[float] = (0.0, 1.0),
        init: Tensor | Literal["uniform"] = "uniform",
    ) -> None:
        super().__init__(latent_dim)
        check_positive_int(num_pseudo_inputs=num_pseudo_inputs)
        check_positive_int(**{f"data_shape[{i}]": size for i, size in enumerate(data_shape)})
        low, high = (float(v) for v in value_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"value_range must be finite (low, high) with low < high, got {tuple(value_range)}")
        self.num_pseudo_inputs = num_pseudo_inputs
        self.data_shape = tuple(data_shape)
        self.value_range = (low, high)
        # a Module would register as a submodule (its parameters twice in the model's state_dict); its call does not
        self._encode = encode.__call__ if isinstance(encode, nn.Module) else encode
        self.pseudo_logits = nn.Parameter(torch.empty(num_pseudo_inputs, *self.data_shape))
        if isinstance(init, Tensor):
            self.set_pseudo_inputs(init)
        elif init == "uniform":
            with torch.no_grad():
                self.pseudo_logits.copy_(torch.logit(_squeeze(torch.rand_like(self.pseudo_logits))))
        else:
            raise ValueError(f"init must be 'uniform' or a tensor of training examples, got {init!r}")

    @property
    def pseudo_inputs(self) -> Tensor:
        """The pseudo-inputs (K, *data_shape), inside value_range."""
        low, high = self.value_range
        return low + (high - low) * torch.sigmoid(self.pseudo_logits)

    @torch.no_grad()
    def set_pseudo_inputs(self, examples: Tensor) -> None:
        """Set the pseudo-inputs to ``examples`` (K, *data_shape) inside value_range (e.g. training examples, in a
        model's ``setup``), each first moved 1% of the range inwards from the bounds, where the logit is finite and the
        sigmoid not yet flat (binarized data sits on the bounds)."""
        expected = (self.num_pseudo_inputs, *self.data_shape)
        if tuple(examples.shape) != expected:
            raise ValueError(
                f"the examples that initialise the pseudo-inputs must have shape (num_pseudo_inputs, *data_shape) "
                f"= {expected}, got {tuple(examples.shape)}"
            )
        low, high = self.value_range
        if not bool(((examples >= low) & (examples <= high)).all()):
            raise ValueError(
                f"the examples that initialise the pseudo-inputs must lie in value_range {self.value_range}, got "
                f"values in [{examples.min().item():.4g}, {examples.max().item():.4g}]"
            )
        fraction = (examples.to(self.pseudo_logits) - low) / (high - low)
        self.pseudo_logits.copy_(torch.logit(_squeeze(fraction)))

    def distribution(self) -> MixtureSameFamily:
        loc, scale = self._encode(self.pseudo_inputs)
        expected = (self.num_pseudo_inputs, self.latent_dim)
        if loc.shape != expected or scale.shape != expected:
            raise ValueError(
                f"the VampPrior's encode must map its pseudo-inputs to loc and scale of shape (num_pseudo_inputs, "
                f"latent_dim) = {expected}, got {tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        components = Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)
        uniform = Categorical(logits=loc.new_zeros(self.num_pseudo_inputs), validate_args=False)
        return MixtureSameFamily(uniform, components, validate_args=False)


def _squeeze(fraction: Tensor, margin: float = 0.01) -> Tensor:
    """Map [0, 1] onto [margin, 1 - margin] (the logit is finite there)."""
    return margin + (1 - 2 * margin) * fraction


def check_codes(z: Tensor, latent_dim: int, method: str) -> None:
    if z.ndim == 0 or z.shape[-1] != latent_dim:
        raise ValueError(f"{method} takes codes of shape (..., latent_dim={latent_dim}), got {tuple(z.shape)}")


def check_prior_supports(prior: str, *, num_classes: int | None) -> None:
    """Refuse an unknown prior, and the VampPrior in a class-conditional model (its pseudo-inputs carry no labels,
    so it cannot be a mixture of the conditional encoder's posteriors)."""
    check_choice("prior", prior, Prior)
    if prior == "vamp" and num_classes is not None:
        raise ValueError(
            f"the vamp prior is unconditional, but num_classes is {num_classes}: use prior 'standard_normal' or "
            "'mixture' (--model.prior) for a class-conditional model, or leave num_classes unset"
        )


def build_prior(
    name: str,
    latent_dim: int,
    *,
    num_components: int = 10,
    num_pseudo_inputs: int = 500,
    data_shape: Sequence[int] | None = None,
    value_range: Sequence[float] = (0.0, 1.0),
    encode: Encode | None = None,
) -> LatentPrior:
    """The prior named ``name`` (one of ``Prior``); ``num_components`` is for ``mixture``; ``num_pseudo_inputs``
    (500 in the paper), ``data_shape``, ``value_range`` and ``encode`` (see ``VampPrior``) are for ``vamp``."""
    check_choice("prior", name, Prior)
    if name == "standard_normal":
        return StandardNormalPrior(latent_dim)
    if name == "mixture":
        return MixturePrior(latent_dim, num_components)
    if data_shape is None or encode is None:
        raise ValueError("the vamp prior needs data_shape and encode (the model's encoder, inputs -> (loc, scale))")
    return VampPrior(latent_dim, num_pseudo_inputs, data_shape, encode, value_range=value_range)
