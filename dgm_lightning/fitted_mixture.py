"""The Gaussian mixture fitted by EM to a model's training codes after training (a post-hoc sampler), and the map from
standard normal noise to its samples."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from dgm_lightning.checks import check_choice, check_positive_int, check_temperature
from dgm_lightning.priors import check_codes

Covariance = Literal["full", "diag"]


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
        check_codes(z, self.latent_dim, "log_prob")
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


def mixture_codes(mixture: FittedMixture, noise: Tensor) -> Tensor:
    """Codes (B, latent_dim) from standard normal noise (B, latent_dim + 1), reparameterised like a learned prior's:
    the component whose share of the cumulative weights holds the normal CDF of the first coordinate, at its mean
    plus its Cholesky factor times the rest (zero noise: the component that holds the median, at its mean)."""
    cumulative = mixture.weights.cumsum(0)
    index = torch.searchsorted(cumulative, torch.special.ndtr(noise[:, 0]).to(cumulative).contiguous())
    index = index.clamp(max=cumulative.shape[0] - 1)  # rounding can leave the last cumulative weight < 1
    rest = noise[:, 1:].to(mixture.means)[:, :, None]  # (B, latent_dim, 1)
    return (mixture.means[index] + (mixture.scale_tril[index] @ rest).squeeze(-1)).to(noise.dtype)
