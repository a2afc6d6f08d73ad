"""Distributions on the unit hypersphere: Power Spherical, von Mises-Fisher and the uniform distribution.

Each is a ``torch.distributions.Distribution`` with a reparameterised ``rsample``, ``log_prob`` and ``entropy``, and
the KLs to the uniform distribution are registered with ``torch.distributions.kl.register_kl``, so that
``kl_divergence(q, HypersphericalUniform(d))`` works as for torch's own distributions.

``d`` is always the **ambient** dimension: the last dim of ``loc`` (a VAE's ``latent_dim``); the samples lie on the
sphere S^{d-1} in R^d. ``d = 2`` is the circle (the von Mises-Fisher distribution is then the von Mises distribution of
the angle), ``d = 3`` the ordinary sphere.

References: Power Spherical, De Cao & Aziz 2020, arXiv:2006.04437; hyperspherical VAE with von Mises-Fisher, Davidson
et al. 2018, arXiv:1804.00891; Wood's sampler, Wood 1994, doi:10.1080/03610919408813161; implicit reparameterisation
gradients, Figurnov et al. 2018, arXiv:1805.08498; the uniform asymptotic (Debye) expansion of I_v, DLMF 10.41.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import torch
from torch import Tensor
from torch.distributions import Dirichlet, Distribution, constraints
from torch.distributions.kl import register_kl
from torch.nn import functional as F

_WOOD_ROUNDS = 100  # rounds of proposals; every round accepts more than half of them, so 100 never run out
_QUADRATURE_NODES = 64  # Gauss-Legendre nodes of the implicit kappa gradient's integral
_TAIL_DROP = 40.0  # the integral's tail is cut where its integrand is below exp(-40) times its value at w
_DEBYE_FROM = 30.0  # log I_v(k) by the Debye expansion where sqrt(v^2 + k^2) >= 30, by the power series below
_SERIES_TERMS = 96  # enough terms of the power series for every k < 30 (its terms peak near m = k / 2)
_DEBYE_TERMS = 10
_NO_SAMPLE_SHAPE = torch.Size()  # one sample per batch element


class _UnitSphere(constraints.Constraint):
    """Vectors of unit Euclidean norm along the last dim, to within the square root of the dtype's precision."""

    event_dim = 1

    def check(self, value: Tensor) -> Tensor:
        tolerance = torch.finfo(value.dtype).eps ** 0.5 if value.is_floating_point() else 0.0
        return (torch.linalg.vector_norm(value, dim=-1) - 1).abs() <= tolerance

    def __repr__(self) -> str:
        return "UnitSphere(norm 1 along the last dim; normalise it, e.g. torch.nn.functional.normalize(x, dim=-1))"


unit_sphere = _UnitSphere()


def log_sphere_area(dim: int) -> float:
    """log of the surface area of the unit sphere S^{dim-1} in R^dim: log(2 pi^{dim/2} / Gamma(dim/2))."""
    return math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)


def _check_dim(dim: int, what: str) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"{what} must be an integer >= 2 (the ambient dimension d; d = 2 is the circle), got {dim!r}")


# -- modified Bessel functions in log space --------------------------------------------------------


@lru_cache
def _debye_coefficients() -> tuple[tuple[float, ...], ...]:
    """u_1..u_N of the Debye expansion (DLMF 10.41.10), u_n(t) = t^n sum_j c_nj t^{2j}, as the c_nj of each n.

    Computed exactly from the recurrence u_{n+1}(t) = t^2 (1 - t^2) u_n'(t) / 2 + 1/8 int_0^t (1 - 5 s^2) u_n(s) ds
    instead of being copied from a table.
    """
    u = [Fraction(1)]
    coefficients = []
    for _ in range(_DEBYE_TERMS):
        derivative = [i * c for i, c in enumerate(u)][1:]
        nxt = [Fraction(0)] * (len(u) + 3)
        for i, c in enumerate(derivative):  # t^2 (1 - t^2) / 2 times t^i
            nxt[i + 2] += c / 2
            nxt[i + 4] -= c / 2
        for i, c in enumerate(u):  # 1/8 int_0^t (1 - 5 s^2) s^i ds
            nxt[i + 1] += c / (8 * (i + 1))
            nxt[i + 3] -= 5 * c / (8 * (i + 3))
        u = nxt
        n = len(coefficients) + 1
        coefficients.append(tuple(float(c) for c in u[n::2]))
    return tuple(coefficients)


def log_bessel_iv_scaled(order: float, k: Tensor) -> Tensor:
    """log(I_v(k) / k^v) for k >= 0: finite at k = 0 (where it is -v log 2 - lgamma(v + 1)) and at large k,
    differentiable in k, accurate to ~1e-14 relative in float64 for any order v >= 0.

    The power series (all its terms positive, summed with logsumexp) where sqrt(v^2 + k^2) < 30, else the Debye
    uniform asymptotic expansion, whose n-th term is O((v^2 + k^2)^{-n/2}) for every v, k. Neither underflows at high
    order and small k nor overflows at large k, the pitfalls of I_v itself.

    Args:
        order: v >= 0 (d / 2 - 1 for the von Mises-Fisher normaliser on S^{d-1}).
        k: the argument (concentration), any shape.
    """
    use_debye = order**2 + k.detach() ** 2 >= _DEBYE_FROM**2
    # each branch sees only inputs where it is used and finite, so that torch.where passes no NaN gradient back
    # (sqrt's at v = k = 0 included)
    k_series = torch.where(use_debye, torch.zeros_like(k), k)
    k_debye = torch.where(use_debye, k, torch.full_like(k, _DEBYE_FROM))
    radius = torch.sqrt(order**2 + k_debye**2)
    return torch.where(use_debye, _log_iv_debye(order, radius), _log_iv_series(order, k_series))


def _log_iv_series(order: float, k: Tensor) -> Tensor:
    """log(I_v(k) / k^v) = -v log 2 + log sum_m (k^2 / 4)^m / (m! Gamma(m + v + 1))."""
    m = torch.arange(_SERIES_TERMS, dtype=k.dtype, device=k.device)
    # the clamp keeps log finite (and its gradient 0) at k = 0, where only the m = 0 term survives
    log_quarter_k2 = torch.log((k * k / 4).clamp_min(torch.finfo(k.dtype).tiny)).unsqueeze(-1)
    terms = m * log_quarter_k2 - torch.lgamma(m + 1) - torch.lgamma(m + order + 1)
    return torch.logsumexp(terms, dim=-1) - order * math.log(2.0)


def _log_iv_debye(order: float, radius: Tensor) -> Tensor:
    """log(I_v(k) / k^v) = r - v log(v + r) - log(2 pi r) / 2 + log(1 + sum_n u_n(t) / v^n), r = sqrt(v^2 + k^2),
    t = v / r, with u_n(t) / v^n = r^{-n} sum_j c_nj t^{2j} (finite at v = 0, where it is Hankel's expansion)."""
    t2 = (order / radius) ** 2
    correction = torch.zeros_like(radius)
    for n, coefficients in enumerate(_debye_coefficients(), start=1):
        polynomial = torch.zeros_like(radius)
        for c in reversed(coefficients):
            polynomial = polynomial * t2 + c
        correction = correction + polynomial / radius**n
    return radius - order * torch.log(order + radius) - 0.5 * torch.log(2 * math.pi * radius) + torch.log1p(correction)


def mean_resultant_length(dim: int, k: Tensor) -> Tensor:
    """A_d(k) = I_{d/2}(k) / I_{d/2-1}(k) = E[loc . z] under the von Mises-Fisher distribution on S^{d-1}."""
    order = 0.5 * dim - 1
    return k * torch.exp(log_bessel_iv_scaled(order + 1, k) - log_bessel_iv_scaled(order, k))


# -- the shared parametrisation --------------------------------------------------------------------


class _SphericalDistribution(Distribution):
    """A distribution on S^{d-1} symmetric about a mean direction ``loc`` with a concentration ``scale``."""

    arg_constraints = {"loc": unit_sphere, "scale": constraints.nonnegative}
    support = unit_sphere
    has_rsample = True

    def __init__(self, loc: Tensor, scale: Tensor | float, *, validate_args: bool | None = None) -> None:
        if loc.dim() < 1:
            raise ValueError(f"loc must have shape (..., d), the mean direction in R^d; got shape {tuple(loc.shape)}")
        _check_dim(loc.shape[-1], "loc's last dim")
        scale = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device)
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], scale.shape)
        self.loc = loc.expand(*batch_shape, loc.shape[-1])
        self.scale = scale.expand(batch_shape)
        super().__init__(batch_shape, loc.shape[-1:], validate_args=validate_args)

    @property
    def dim(self) -> int:
        """The ambient dimension d (samples lie on S^{d-1} in R^d)."""
        return self.event_shape[0]

    @property
    def mode(self) -> Tensor:
        return self.loc

    def expand(self, batch_shape: torch.Size, _instance: Distribution | None = None) -> _SphericalDistribution:
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.scale = self.scale.expand(batch_shape)
        Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape: torch.Size = _NO_SAMPLE_SHAPE) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def _place(self, w: Tensor, radius: Tensor) -> Tensor:
        """Samples z = Q [w, radius v] with v uniform on S^{d-2} and Q orthogonal with Q e1 = loc.

        w (= loc . z) and radius (= sqrt(1 - w^2), computed by the caller without cancellation) have shape
        sample_shape + batch_shape.
        """
        v = F.normalize(torch.randn(*w.shape, self.dim - 1, dtype=w.dtype, device=w.device), dim=-1)
        y = torch.cat([w.unsqueeze(-1), radius.unsqueeze(-1) * v], dim=-1)
        # The Householder reflection across u = e1 - loc maps e1 to loc but degenerates (0/0, gradients ~ 1/|u|) as
        # loc nears e1. There we reflect across u = e1 + loc instead (e1 -> -loc) and negate: also orthogonal, also
        # e1 -> loc, and y's law is invariant under the orthogonal maps that fix e1. So |u|^2 >= 2 always.
        sign = torch.where(self.loc[..., :1] > 0, -1.0, 1.0).to(self.loc.dtype)
        u = -sign * self.loc
        u = torch.cat([u[..., :1] + 1, u[..., 1:]], dim=-1)
        u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)
        return sign * (y - 2 * u * (u * y).sum(-1, keepdim=True))


# -- Power Spherical -------------------------------------------------------------------------------


class PowerSpherical(_SphericalDistribution):
    """The Power Spherical distribution on S^{d-1}: density (1 + loc . z)^scale / N(scale, d).

    Sampled without rejection: t = loc . z = 2 B - 1 with B ~ Beta((d - 1) / 2 + scale, (d - 1) / 2), reparameterised
    through torch's Dirichlet (the Beta's two components, so that sqrt(1 - t^2) = 2 sqrt(B (1 - B)) has no
    cancellation near t = +-1), a uniform tangent direction, and a Householder reflection from e1 to loc.

    Args:
        loc: mean direction, unit vectors of shape (..., d); d is the ambient dimension (d = 2: the circle).
        scale: concentration >= 0, shape (...) broadcastable with loc's batch shape (0: the uniform distribution).
        validate_args: check the arguments and the values given to ``log_prob`` (torch's default: on).

    References: De Cao & Aziz 2020, arXiv:2006.04437.
    """

    def _beta_parameters(self) -> tuple[Tensor, Tensor]:
        beta = torch.full_like(self.scale, 0.5 * (self.dim - 1))
        return beta + self.scale, beta

    def rsample(self, sample_shape: torch.Size = _NO_SAMPLE_SHAPE) -> Tensor:
        alpha, beta = self._beta_parameters()
        parts = Dirichlet(torch.stack([alpha, beta], dim=-1), validate_args=False).rsample(sample_shape)
        b, one_minus_b = parts.unbind(-1)
        tiny = torch.finfo(parts.dtype).tiny  # sqrt's gradient is infinite at 0
        return self._place(b - one_minus_b, 2 * torch.sqrt((b * one_minus_b).clamp_min(tiny)))

    def log_normalizer(self) -> Tensor:
        """log N(scale, d) = (a + b) log 2 + b log pi + lgamma(a) - lgamma(a + b), a = b + scale, b = (d - 1) / 2."""
        alpha, beta = self._beta_parameters()
        return (
            (alpha + beta) * math.log(2.0) + beta * math.log(math.pi) + torch.lgamma(alpha) - torch.lgamma(alpha + beta)
        )

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        # xlogy: 0 * log 0 = 0 at z = -loc with scale 0; the clamp absorbs rounding below -1
        cosine = (self.loc * value).sum(-1)
        return torch.xlogy(self.scale, (1 + cosine).clamp_min(0)) - self.log_normalizer()

    def entropy(self) -> Tensor:
        alpha, beta = self._beta_parameters()
        mean_log = math.log(2.0) + torch.digamma(alpha) - torch.digamma(alpha + beta)  # E[log(1 + loc . z)]
        return self.log_normalizer() - self.scale * mean_log

    @property
    def mean(self) -> Tensor:
        return (self.scale / (self.dim - 1 + self.scale)).unsqueeze(-1) * self.loc


# -- von Mises-Fisher ------------------------------------------------------------------------------


class VonMisesFisher(_SphericalDistribution):
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

    def rsample(self, sample_shape: torch.Size = _NO_SAMPLE_SHAPE) -> Tensor:
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


# -- the uniform distribution and the KLs ----------------------------------------------------------


class HypersphericalUniform(Distribution):
    """The uniform distribution on S^{dim-1} in R^dim (the prior of a hyperspherical VAE).

    Args:
        dim: the ambient dimension d >= 2 (d = 2: the circle).
        dtype: of the samples (None: torch's default dtype).
        device: of the samples (None: the default device).
        validate_args: check the values given to ``log_prob`` (torch's default: on).
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    support = unit_sphere
    has_rsample = True

    def __init__(
        self,
        dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        validate_args: bool | None = None,
    ) -> None:
        _check_dim(dim, "dim")
        self.dim = dim
        self._dtype = dtype if dtype is not None else torch.get_default_dtype()
        self._device = torch.device(device) if device is not None else None
        super().__init__(torch.Size(), torch.Size([dim]), validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: Distribution | None = None) -> HypersphericalUniform:
        new = self._get_checked_instance(HypersphericalUniform, _instance)
        new.dim, new._dtype, new._device = self.dim, self._dtype, self._device
        Distribution.__init__(new, torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: torch.Size = _NO_SAMPLE_SHAPE) -> Tensor:
        gaussian = torch.randn(self._extended_shape(sample_shape), dtype=self._dtype, device=self._device)
        return F.normalize(gaussian, dim=-1)

    def sample(self, sample_shape: torch.Size = _NO_SAMPLE_SHAPE) -> Tensor:
        return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        return torch.full(shape, -log_sphere_area(self.dim), dtype=value.dtype, device=value.device)

    def entropy(self) -> Tensor:
        return torch.full(self.batch_shape, log_sphere_area(self.dim), dtype=self._dtype, device=self._device)

    @property
    def mean(self) -> Tensor:
        return torch.zeros(self.batch_shape + self.event_shape, dtype=self._dtype, device=self._device)


def _check_same_sphere(q: _SphericalDistribution, p: HypersphericalUniform) -> None:
    if q.dim != p.dim:
        raise ValueError(f"KL between distributions on different spheres: q has d = {q.dim}, the uniform p d = {p.dim}")


@register_kl(PowerSpherical, HypersphericalUniform)
def _kl_power_spherical_uniform(q: PowerSpherical, p: HypersphericalUniform) -> Tensor:
    """KL(q || uniform) = -H(q) + log |S^{d-1}| (De Cao & Aziz 2020, arXiv:2006.04437)."""
    _check_same_sphere(q, p)
    return (log_sphere_area(q.dim) - q.entropy()).expand(torch.broadcast_shapes(q.batch_shape, p.batch_shape))


@register_kl(VonMisesFisher, HypersphericalUniform)
def _kl_von_mises_fisher_uniform(q: VonMisesFisher, p: HypersphericalUniform) -> Tensor:
    """KL(q || uniform) = kappa A_d(kappa) + log C_d(kappa) + log |S^{d-1}| (Davidson et al. 2018, arXiv:1804.00891)."""
    _check_same_sphere(q, p)
    return (log_sphere_area(q.dim) - q.entropy()).expand(torch.broadcast_shapes(q.batch_shape, p.batch_shape))
