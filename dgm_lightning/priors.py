"""Priors p(z) of the latent-variable models (standard normal, a learned Gaussian mixture, the VampPrior) and the
Gaussian mixture fitted to training codes after training (a post-hoc sampler).

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
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, MultivariateNormal, Normal

from dgm_lightning.checks import check_choice, check_positive_int, check_temperature

Prior = Literal["standard_normal", "mixture", "vamp"]
Covariance = Literal["full", "diag"]

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
        _check_codes(z, self.latent_dim, "log_prob")
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


def _check_codes(z: Tensor, latent_dim: int, method: str) -> None:
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


class FittedMixture(nn.Module):
    """A Gaussian mixture fitted by EM to codes (N, latent_dim) after training, to sample codes from (a post-hoc
    sampler: it improves the samples of deterministic and weakly regularised autoencoders, Ghosh et al. 2019,
    arXiv:1903.12436; Chadebec et al. 2022, pythae, arXiv:2206.08309).

    Its parameters are buffers (weights (K,), means (K, D), Cholesky factors of the covariances (K, D, D)), empty
    until ``fit``: they are saved in a checkpoint, move with the model, and a fresh module loads a fitted one's
    state_dict whatever its K. Covariances are full by default: K * D^2 numbers is cheap at the latent sizes used
    here, and full covariances follow the correlated codes of an autoencoder that a diagonal one would miss.

    EM is written in torch rather than taken from scikit-learn's GaussianMixture so that it runs on the model's
    device on codes already there (under DDP: the codes gathered from all ranks, each rank fitting the same mixture
    from the same seed), and its result is tensors from the start, with no copying of another library's private
    attributes; the tests compare its fit with scikit-learn's.

    Args:
        latent_dim: size of a code.
    """

    # EM stops when the mean log-likelihood per code improves by less than this (nats)
    tolerance: ClassVar[float] = 1e-6
    # covariance jitter, relative to the codes' mean variance (absolute in scikit-learn, where data are standardised)
    jitter: ClassVar[float] = 1e-6

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        check_positive_int(latent_dim=latent_dim)
        self.latent_dim = latent_dim
        self.register_buffer("weights", torch.zeros(0))
        self.register_buffer("means", torch.zeros(0, latent_dim))
        self.register_buffer("scale_tril", torch.zeros(0, latent_dim, latent_dim))
        self.register_load_state_dict_pre_hook(_resize_to_state_dict)

    @property
    def fitted(self) -> bool:
        """Whether ``fit`` has run (or a fitted state_dict was loaded)."""
        return self.weights.numel() > 0

    @property
    def num_components(self) -> int:
        """K, the number of fitted components (0 before ``fit``)."""
        return self.weights.numel()

    @torch.no_grad()
    def fit(
        self, codes: Tensor, num_components: int, *, iterations: int = 100, seed: int = 0,
        covariance: Covariance = "full",
    ) -> FittedMixture:  # fmt: skip
        """Fit ``num_components`` Gaussians to ``codes`` (N, latent_dim) by EM (at most ``iterations`` steps) from a
        k-means++ start drawn with ``seed``; a component left without codes is re-seeded at the code the mixture
        explains worst. Computes in float64; keeps the codes' device and dtype (float32 for half-precision codes).
        Returns self."""
        self._check_fit(codes, num_components, iterations, covariance)
        work = torch.float32 if codes.device.type == "mps" else torch.float64  # MPS has no float64
        x = codes.to(work)
        centre = x.mean(0)
        x = x - centre  # EM's second moments lose less precision about the mean
        reg = self.jitter * x.var(0).mean().clamp_min(torch.finfo(work).eps)  # identical codes still get some
        generator = torch.Generator(device=x.device).manual_seed(seed)
        means = _kmeans_plus_plus(x, num_components, generator)
        squared_distance = torch.cdist(x, means).square()  # (N, K)
        resp = nn.functional.one_hot(squared_distance.argmin(1), num_components).to(work)
        params = _m_step(x, resp, -squared_distance.min(1).values, reg, covariance)
        previous = -math.inf
        for _ in range(iterations):
            log_joint = _log_joint(x, *params)  # (N, K): log w_k + log N(x_n; mu_k, Sigma_k)
            log_lik = log_joint.logsumexp(1)
            current = log_lik.mean().item()
            if current - previous < self.tolerance:
                break
            previous = current
            params = _m_step(x, (log_joint - log_lik[:, None]).exp(), log_lik, reg, covariance)
        weights, means, scale_tril = params
        store = torch.promote_types(codes.dtype, torch.float32)  # half-precision triangular solves are not everywhere
        self.weights, self.means, self.scale_tril = weights.to(store), (means + centre).to(store), scale_tril.to(store)
        return self

    def _check_fit(self, codes: Tensor, num_components: int, iterations: int, covariance: str) -> None:
        check_positive_int(num_components=num_components, iterations=iterations)
        check_choice("covariance", covariance, Covariance)
        if codes.ndim != 2 or codes.shape[1] != self.latent_dim:
            raise ValueError(f"fit takes codes of shape (N, latent_dim={self.latent_dim}), got {tuple(codes.shape)}")
        if codes.shape[0] < num_components:
            raise ValueError(
                f"fitting {num_components} components needs at least as many codes, got {codes.shape[0]}: "
                "lower num_components or fit on more codes"
            )
        if not bool(codes.isfinite().all()):
            raise ValueError("fit takes finite codes, got NaN or Inf: check the model that produced them")

    def _check_fitted(self, method: str) -> None:
        if not self.fitted:
            raise RuntimeError(f"FittedMixture.{method} needs a fitted mixture: call fit(codes, num_components) first")

    def distribution(self) -> MixtureSameFamily:
        """The fitted mixture as a torch distribution with event shape (latent_dim,)."""
        self._check_fitted("distribution")
        components = MultivariateNormal(self.means, scale_tril=self.scale_tril, validate_args=False)
        return MixtureSameFamily(Categorical(probs=self.weights, validate_args=False), components, validate_args=False)

    def log_prob(self, z: Tensor) -> Tensor:
        """log density of codes (..., latent_dim) under the fitted mixture, in nats, shape (...)."""
        _check_codes(z, self.latent_dim, "log_prob")
        self._check_fitted("log_prob")
        flat = z.reshape(-1, self.latent_dim).to(self.means)
        return _log_joint(flat, self.weights, self.means, self.scale_tril).logsumexp(1).view(z.shape[:-1])

    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """n codes (n, latent_dim); ``generator`` (on the buffers' device) makes them reproducible; ``temperature``
        scales each component's spread (0 gives the component means)."""
        self._check_fitted("sample")
        check_positive_int(n=n)
        check_temperature(temperature)
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        noise = torch.randn(
            n, self.latent_dim, 1, generator=generator, device=self.means.device, dtype=self.means.dtype
        )
        return self.means[component] + temperature * (self.scale_tril[component] @ noise).squeeze(-1)


def _resize_to_state_dict(module: FittedMixture, state_dict: dict, prefix: str, *args: object) -> None:
    """Load-state-dict pre-hook: give the buffers the shapes (and dtype) of the loaded ones, whose K is set by
    ``fit``; a different latent size is left for load_state_dict to report."""
    for name in ("weights", "means", "scale_tril"):
        value = state_dict.get(prefix + name)
        if value is not None and (name == "weights" or value.shape[-1] == module.latent_dim):
            setattr(module, name, torch.empty_like(value, device=getattr(module, name).device))


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k starting means (k, D) drawn among the codes x (N, D), each with probability proportional to its squared
    distance to the nearest mean drawn before (Arthur & Vassilvitskii 2007); uniformly once all distances are 0."""
    chosen = torch.randint(x.shape[0], (1,), generator=generator, device=x.device)
    distance = (x - x[chosen]).square().sum(1)  # (N,)
    for _ in range(k - 1):
        weights = distance if bool(distance.sum() > 0) else torch.ones_like(distance)
        index = torch.multinomial(weights, 1, generator=generator)
        chosen = torch.cat([chosen, index])
        distance = torch.minimum(distance, (x - x[index]).square().sum(1))
    return x[chosen]


def _log_joint(x: Tensor, weights: Tensor, means: Tensor, scale_tril: Tensor) -> Tensor:
    """log w_k + log N(x_n; mu_k, L_k L_k^T) for codes x (N, D): (N, K). One triangular solve per component with N
    right-hand sides: several times faster than MultivariateNormal.log_prob, which solves N * K systems."""
    diff = (x[None, :, :] - means[:, None, :]).transpose(1, 2)  # (K, D, N)
    whitened = torch.linalg.solve_triangular(scale_tril, diff, upper=False)  # L_k^-1 (x_n - mu_k)
    half_log_det = scale_tril.diagonal(dim1=1, dim2=2).log().sum(1)  # (K,)
    log_density = -0.5 * whitened.square().sum(1) - half_log_det[:, None] - 0.5 * x.shape[1] * math.log(2 * math.pi)
    return weights.log() + log_density.T


def _m_step(x: Tensor, resp: Tensor, log_lik: Tensor, reg: Tensor, covariance: str) -> tuple[Tensor, Tensor, Tensor]:
    """Weights (K,), means (K, D) and Cholesky factors (K, D, D) from responsibilities (N, K). A component with no
    responsibility is re-seeded at the codes with the lowest ``log_lik`` (N,), with the codes' covariance and the
    weight of one code, instead of dividing by zero."""
    n, d = x.shape
    counts = resp.sum(0)  # (K,)
    empty = counts < 1e-8 * n
    means = resp.T @ x / counts.clamp_min(torch.finfo(x.dtype).tiny)[:, None]
    second = torch.einsum("nk,nd,ne->kde", resp, x, x) / counts.clamp_min(torch.finfo(x.dtype).tiny)[:, None, None]
    cov = second - means[:, :, None] * means[:, None, :]
    if bool(empty.any()):
        worst = log_lik.argsort()[: int(empty.sum())]
        means[empty], cov[empty], counts[empty] = x[worst], x.T @ x / n, 1.0
    if covariance == "diag":
        cov = torch.diag_embed(cov.diagonal(dim1=1, dim2=2))
    return counts / counts.sum(), means, _cholesky(cov, reg)


def _cholesky(cov: Tensor, reg: Tensor) -> Tensor:
    """Cholesky factors of covariances (K, D, D) plus ``reg`` * I, the jitter raised tenfold (up to 1e6 times)
    until every factorisation succeeds (a component on fewer than D + 1 distinct codes is singular)."""
    cov = 0.5 * (cov + cov.transpose(1, 2))
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    for attempt in range(7):
        factor, info = torch.linalg.cholesky_ex(cov + reg * 10**attempt * eye)
        if not bool(info.any()):
            return factor
    raise ValueError("the codes' covariance could not be factorised even with jitter: check the codes for overflow")
