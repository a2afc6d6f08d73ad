"""The von Mises-Fisher distribution with Wood's rejection sampler and implicit reparameterisation gradients
(Davidson et al. 2018, arXiv:1804.00891; Wood 1994; Figurnov et al. 2018, arXiv:1805.08498)."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor
from torch.distributions import Dirichlet

from dgm_lightning.distributions.bessel import log_bessel_iv_scaled, mean_resultant_length
from dgm_lightning.distributions.sphere import NO_SAMPLE_SHAPE, SphericalDistribution

_WOOD_ROUNDS = 100  # rounds of proposals; every round accepts more than half of them, so 100 never run out
_QUADRATURE_NODES = 64  # Gauss-Legendre nodes of the implicit kappa gradient's integral
_TAIL_DROP = 40.0  # the integral's tail is cut where its integrand is below exp(-40) times its value at w


class VonMisesFisher(SphericalDistribution):
    """The von Mises-Fisher distribution on S^{d-1}: density C_d(scale) exp(scale loc . z).

    ``rsample``: w = loc . z by Wood's rejection sampler (batched rounds of vectorised proposals), a uniform tangent
    direction and a Householder reflection from e1 to loc (the pathwise gradient for loc). The gradient for
    ``scale`` is the **implicit reparameterisation gradient** dw/dkappa = -(dF(w; kappa)/dkappa) / p(w; kappa) of the
    marginal CDF F of w (Figurnov et al. 2018), which is exact (no correction term is needed, unlike the
    reparameterised rejection sampler of Davidson et al. 2018, whose correction depends on the loss). It is computed
    as dw/dkappa = int_w^1 (s - A) g(s) ds / g(w) = -int_{-1}^w (s - A) g(s) ds / g(w), g(s) = exp(kappa s)
    (1 - s^2)^{(d-3)/2}, A = E[w], taking the side whose integrand has one sign, by Gauss-Legendre quadrature in the
    angle arccos(s). With d = 2 this is the von Mises distribution of the angle.

    Args:
        loc: mean direction, unit vectors of shape (..., d); d is the ambient dimension (d = 2: the circle).
        scale: concentration kappa >= 0, shape (...) broadcastable with loc's batch shape (0: the uniform one).
        validate_args: check the arguments and the values given to ``log_prob`` (torch's default: on).

    References: Davidson et al. 2018, arXiv:1804.00891; Wood 1994, doi:10.1080/03610919408813161;
        Figurnov et al. 2018, arXiv:1805.08498.
    """

    def _log_bessel(self) -> Tensor:
        return log_bessel_iv_scaled(0.5 * self.dim - 1, self.scale)

    def log_normalizer(self) -> Tensor:
        """log C_d(kappa) = (d/2 - 1) log kappa - (d/2) log(2 pi) - log I_{d/2-1}(kappa), computed in log space."""
        return -0.5 * self.dim * math.log(2 * math.pi) - self._log_bessel()

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self.scale * (self.loc * value).sum(-1) + self.log_normalizer()

    def entropy(self) -> Tensor:
        return -self.log_normalizer() - self.scale * mean_resultant_length(self.dim, self.scale)

    @property
    def mean(self) -> Tensor:
        return mean_resultant_length(self.dim, self.scale).unsqueeze(-1) * self.loc

    def rsample(self, sample_shape: torch.Size = NO_SAMPLE_SHAPE) -> Tensor:
        kappa = self.scale.expand(self._extended_shape(sample_shape)[:-1])
        with torch.no_grad():
            w, radius = _wood_sample(kappa.detach(), self.dim)
        if torch.is_grad_enabled() and self.scale.requires_grad:
            with torch.no_grad():
                mean = mean_resultant_length(self.dim, kappa.detach())
                dw = _implicit_dw_dkappa(w, radius, kappa.detach(), mean, self.dim)
                # d sqrt(1 - w^2) / dkappa = -(w / sqrt(1 - w^2)) dw/dkappa, and dw/dkappa -> 0 as w -> +-1
                dradius = -w * dw / radius.clamp_min(torch.finfo(w.dtype).tiny)
            zero = kappa - kappa.detach()  # 0, but its gradient reaches scale: w and radius get the implicit one
            w, radius = w + dw * zero, radius + dradius * zero
        return self._place(w, radius)


def _wood_sample(kappa: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """w = loc . z under the von Mises-Fisher distribution, and sqrt(1 - w^2), each of kappa's shape (Wood 1994)."""
    m = dim - 1
    root = torch.sqrt(4 * kappa**2 + m**2)
    b = m / (2 * kappa + root)  # = (root - 2 kappa) / m without its cancellation at large kappa
    a = (m + 2 * kappa + root) / 4
    bound = 4 * a * b / (1 + b) - m * math.log(m)
    half = torch.full((2,), 0.5 * m, dtype=kappa.dtype, device=kappa.device)
    w, radius = torch.empty_like(kappa), torch.empty_like(kappa)
    # a non-finite kappa (a diverged encoder) gives NaN samples at once, for the models' divergence policy to report,
    # rather than proposals that are never accepted
    finite = kappa.isfinite()
    w, radius = torch.where(finite, w, math.nan), torch.where(finite, radius, math.nan)
    done = ~finite
    for _ in range(_WOOD_ROUNDS):
        # e ~ Beta(m/2, m/2) with 1 - e computed separately, for sqrt(1 - w^2) without cancellation near w = +-1
        e, one_minus_e = Dirichlet(half, validate_args=False).sample(kappa.shape).unbind(-1)
        denominator = 1 - (1 - b) * e
        t = 2 * a * b / denominator
        accept = ~done & (m * torch.log(t) - t + bound > torch.log(torch.rand_like(kappa)))
        w = torch.where(accept, (1 - (1 + b) * e) / denominator, w)
        radius = torch.where(accept, 2 * torch.sqrt(b * e * one_minus_e) / denominator, radius)
        done = done | accept
        if bool(done.all()):
            return w, radius
    raise RuntimeError(f"Wood's sampler accepted no proposal in {_WOOD_ROUNDS} rounds for some kappa; got {kappa}")


@lru_cache
def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of n-point Gauss-Legendre quadrature on [-1, 1] (Golub-Welsch), in float64."""
    i = torch.arange(1, n, dtype=torch.float64)
    off_diagonal = i / torch.sqrt(4 * i**2 - 1)
    nodes, vectors = torch.linalg.eigh(torch.diag(off_diagonal, 1) + torch.diag(off_diagonal, -1))
    return nodes, 2 * vectors[0] ** 2


def _implicit_dw_dkappa(w: Tensor, radius: Tensor, kappa: Tensor, mean: Tensor, dim: int) -> Tensor:
    """dw/dkappa = -(dF/dkappa) / p(w) for the marginal of w, all arguments of one shape (see VonMisesFisher).

    In the angle phi = arccos(s) the integrand is (cos phi - A) exp(kappa (cos phi - w)) sin^{d-2}(phi) /
    sin^{d-3}(theta), theta = arccos(w): smooth for every d (the (1 - s^2)^{-1/2} of d = 2 disappears).
    Above the mean it is integrated over [0, theta] (s in [w, 1]), below it over [theta, pi] (s in [-1, w]), cut
    where the integrand has fallen by exp(-40) so that the nodes resolve a peak of width ~ 1 / sqrt(kappa).
    """
    theta = torch.atan2(radius, w)
    tiny = torch.finfo(w.dtype).tiny
    log_sin_theta = torch.log(radius.clamp_min(tiny))
    upper = w >= mean  # integrate towards phi = 0 above the mean, towards pi below it
    span = torch.where(upper, theta, math.pi - theta)
    direction = torch.where(upper, -1.0, 1.0).to(w.dtype)

    def log_ratio(phi: Tensor) -> Tensor:  # log of the integrand without (cos phi - A), phi: (..., n)
        th = theta.unsqueeze(-1)
        cos_difference = -2 * torch.sin((phi + th) / 2) * torch.sin((phi - th) / 2)  # cos phi - cos theta
        log_sin = torch.log(torch.sin(phi).clamp_min(tiny))
        return kappa.unsqueeze(-1) * cos_difference + (dim - 2) * log_sin - (dim - 3) * log_sin_theta.unsqueeze(-1)

    # the shortest of the spans span * 2^-j beyond which (at every longer one) the integrand has fallen by exp(-40)
    fractions = 2.0 ** -torch.arange(41, dtype=w.dtype, device=w.device)
    probes = theta.unsqueeze(-1) + (direction * span).unsqueeze(-1) * fractions
    fallen = log_ratio(probes) < log_ratio(theta.unsqueeze(-1)) - _TAIL_DROP
    steps = torch.cumprod(fallen.to(w.dtype), dim=-1).sum(-1)  # how many of the longest spans the integrand is past
    length = span * torch.where(steps > 0, 2.0 ** -(steps - 1), torch.ones_like(span))

    nodes, weights = (x.to(w.dtype).to(w.device) for x in _gauss_legendre(_QUADRATURE_NODES))
    phi = theta.unsqueeze(-1) + (direction * length).unsqueeze(-1) * (nodes + 1) / 2
    integrand = (torch.cos(phi) - mean.unsqueeze(-1)) * torch.exp(log_ratio(phi))
    integral = length / 2 * (weights * integrand).sum(-1)
    return torch.where(upper, integral, -integral)
