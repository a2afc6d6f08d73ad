"""Hyperspherical distributions of ``dgm_lightning.distributions`` against closed forms and Monte Carlo references,
in float64: samples on the sphere with the right mean resultant length, normalised densities, KL and entropy,
finite and correct reparameterisation gradients, broadcasting and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import VonMises, kl_divergence
from torch.nn import functional as F

from dgm_lightning.distributions import (
    HypersphericalUniform,
    PowerSpherical,
    VonMisesFisher,
    log_bessel_iv_scaled,
    log_sphere_area,
    mean_resultant_length,
)

DTYPE = torch.float64
N = 20000
DIMS = (2, 3, 10, 64)
FAMILIES = (PowerSpherical, VonMisesFisher)


def _direction(d: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(d, dtype=DTYPE, generator=generator), dim=-1)


def _e1(d: int, sign: float = 1.0) -> torch.Tensor:
    e1 = torch.zeros(d, dtype=DTYPE)
    e1[0] = sign
    return e1


def _expected_cosine(family: type, d: int, kappa: torch.Tensor) -> torch.Tensor:
    """E[loc . z] in closed form: A_d(kappa) for vMF, kappa / (d - 1 + kappa) for Power Spherical."""
    if family is VonMisesFisher:
        return mean_resultant_length(d, kappa)
    return kappa / (d - 1 + kappa)


def _within_monte_carlo_error(samples: torch.Tensor, expected: torch.Tensor, *, sigmas: float = 5.0) -> None:
    """The sample mean of ``samples`` (dim 0) agrees with ``expected`` within ``sigmas`` standard errors."""
    error = (samples.mean(0) - expected).abs()
    standard_error = samples.std(0) / math.sqrt(samples.shape[0])
    assert torch.all(error <= sigmas * standard_error + 1e-12), (error, standard_error)


# -- the log-Bessel function -----------------------------------------------------------------------


@pytest.mark.parametrize("d", (2, 3, 10, 11, 64, 65, 400))
def test_log_bessel_matches_scipy_and_its_limit_at_zero(d):
    special = pytest.importorskip("scipy.special")
    order = d / 2 - 1
    k = torch.cat([torch.tensor([1e-3, 0.5], dtype=DTYPE), torch.logspace(0, 4, 60, dtype=DTYPE)])
    reference = torch.from_numpy(special.ive(order, k.numpy())).log() + k - order * k.log()
    finite = torch.isfinite(reference)  # scipy's ive underflows at high order and small k, which ours must not
    torch.testing.assert_close(log_bessel_iv_scaled(order, k)[finite], reference[finite], rtol=1e-12, atol=1e-12)
    at_zero = log_bessel_iv_scaled(order, torch.zeros(1, dtype=DTYPE))
    torch.testing.assert_close(at_zero, torch.tensor([-order * math.log(2) - math.lgamma(order + 1)], dtype=DTYPE))
    assert torch.isfinite(log_bessel_iv_scaled(order, torch.tensor([1e-3, 1e6], dtype=DTYPE))).all()


def test_mean_resultant_length_and_its_gradient_match_the_bessel_ratio():
    special = pytest.importorskip("scipy.special")
    k = torch.tensor([1e-3, 0.3, 3.0, 29.0, 31.0, 500.0], dtype=DTYPE, requires_grad=True)
    for d in DIMS:
        reference = special.ive(d / 2, k.detach().numpy()) / special.ive(d / 2 - 1, k.detach().numpy())
        torch.testing.assert_close(mean_resultant_length(d, k), torch.from_numpy(reference), rtol=1e-10, atol=0)
        # d/dk log(I_v(k) / k^v) = I_{v+1}(k) / I_v(k): autograd through both branches of the log-Bessel
        (gradient,) = torch.autograd.grad(log_bessel_iv_scaled(d / 2 - 1, k).sum(), k)
        torch.testing.assert_close(gradient, torch.from_numpy(reference), rtol=1e-10, atol=0)


# -- samples ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("d", DIMS)
def test_samples_lie_on_the_sphere_with_the_closed_form_mean_resultant_length(family, d):
    loc = _direction(d)
    kappa = torch.tensor([0.5, 5.0, 50.0], dtype=DTYPE)
    z = family(loc, kappa).sample((N,))
    assert z.shape == (N, 3, d)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(N, 3, dtype=DTYPE), rtol=0, atol=1e-6)
    _within_monte_carlo_error((z * loc).sum(-1), _expected_cosine(family, d, kappa))
    # symmetric about loc: the mean is along loc (its part orthogonal to loc averages to 0)
    orthogonal = z - (z * loc).sum(-1, keepdim=True) * loc
    _within_monte_carlo_error(orthogonal, torch.zeros(3, d, dtype=DTYPE))
    torch.testing.assert_close(family(loc, kappa).mean, _expected_cosine(family, d, kappa).unsqueeze(-1) * loc)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cosine_has_the_exact_law_on_the_sphere(family):
    # d = 3: w = loc . z has density ~ exp(kappa w) (vMF) or (1 + w)^kappa (Power Spherical) on [-1, 1]
    stats = pytest.importorskip("scipy.stats")
    kappa = 4.0
    w = (family(_e1(3), kappa).sample((N,)) * _e1(3)).sum(-1).numpy()
    if family is VonMisesFisher:

        def cdf(x):
            return (torch.as_tensor(kappa * (x - 1)).exp() - math.exp(-2 * kappa)).numpy() / (1 - math.exp(-2 * kappa))
    else:

        def cdf(x):
            return ((1 + x) / 2) ** (kappa + 1)

    assert stats.kstest(w, cdf).pvalue > 1e-3


def test_uniform_samples_lie_on_the_sphere_with_mean_zero_and_second_moment_identity_over_d():
    for d in DIMS:
        z = HypersphericalUniform(d, dtype=DTYPE).sample((N,))
        assert z.shape == (N, d) and z.dtype == DTYPE
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(N, dtype=DTYPE), rtol=0, atol=1e-6)
        _within_monte_carlo_error(z, torch.zeros(d, dtype=DTYPE))
        _within_monte_carlo_error(z[:, 0] ** 2, torch.tensor(1 / d, dtype=DTYPE))


# -- densities -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kappa", (0.0, 1.0, 50.0, 500.0))
def test_log_prob_integrates_to_one_on_the_circle(family, kappa):
    angle = torch.linspace(-math.pi, math.pi, 8193, dtype=DTYPE)[:-1]  # periodic: the rectangle rule is spectral
    z = torch.stack([angle.cos(), angle.sin()], dim=-1)
    density = family(_direction(2), kappa).log_prob(z).exp()
    torch.testing.assert_close(density.sum() * 2 * math.pi / angle.numel(), torch.tensor(1.0, dtype=DTYPE))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("d", (3, 10, 64))
def test_log_prob_integrates_to_one_on_the_sphere(family, d):
    # int p dS = |S^{d-2}| int_0^pi p(cos t) sin^{d-2} t dt for a density of the angle t to loc
    t = torch.linspace(0, math.pi, 20001, dtype=DTYPE)
    z = torch.stack([t.cos(), t.sin()] + [torch.zeros_like(t)] * (d - 2), dim=-1)
    for kappa in (0.0, 2.0, 80.0):
        integrand = family(_e1(d), kappa).log_prob(z).exp() * t.sin() ** (d - 2)
        total = math.exp(log_sphere_area(d - 1)) * torch.trapezoid(integrand, t)
        torch.testing.assert_close(total, torch.tensor(1.0, dtype=DTYPE), rtol=1e-6, atol=0)


def test_von_mises_fisher_on_the_circle_is_torch_von_mises():
    mu, kappa = 0.7, torch.tensor([1e-3, 0.5, 3.0, 20.0, 500.0], dtype=DTYPE)
    angle = torch.linspace(-math.pi, math.pi, 101, dtype=DTYPE).unsqueeze(-1)  # (101, 1) against 5 kappas
    z = torch.stack([angle.cos(), angle.sin()], dim=-1)
    loc = torch.tensor([math.cos(mu), math.sin(mu)], dtype=DTYPE)
    ours = VonMisesFisher(loc, kappa).log_prob(z)
    theirs = VonMises(torch.tensor(mu, dtype=DTYPE), kappa).log_prob(angle)
    # torch's log I_0 is a polynomial approximation (relative error < 2e-7); ours is exact to ~1e-15
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_uniform_log_prob_is_minus_the_log_surface_area():
    torch.testing.assert_close(torch.tensor(log_sphere_area(2)), torch.tensor(math.log(2 * math.pi)))
    torch.testing.assert_close(torch.tensor(log_sphere_area(3)), torch.tensor(math.log(4 * math.pi)))
    uniform = HypersphericalUniform(5, dtype=DTYPE)
    z = uniform.sample((7,))
    torch.testing.assert_close(uniform.log_prob(z), torch.full((7,), -log_sphere_area(5), dtype=DTYPE))
    torch.testing.assert_close(uniform.entropy(), torch.tensor(log_sphere_area(5), dtype=DTYPE))


# -- KL and entropy --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("d", DIMS)
def test_kl_to_uniform_matches_monte_carlo_at_small_and_large_kappa(family, d):
    q, p = family(_direction(d), torch.tensor([1e-3, 1.0, 500.0], dtype=DTYPE)), HypersphericalUniform(d)
    kl = kl_divergence(q, p)  # through torch's registry
    assert kl.shape == (3,) and torch.isfinite(kl).all() and (kl > -1e-12).all()
    z = q.sample((N,))
    _within_monte_carlo_error(q.log_prob(z) - p.log_prob(z), kl)
    # the entropy is -E[log q]
    _within_monte_carlo_error(-q.log_prob(z), q.entropy())


def test_kl_closed_forms_by_hand():
    d, kappa = 3, torch.tensor(2.0, dtype=DTYPE)
    # vMF on S^2: log C = log(kappa / (4 pi sinh kappa)), A = coth kappa - 1 / kappa
    vmf = VonMisesFisher(_e1(d), kappa)
    a = 1 / torch.tanh(kappa) - 1 / kappa
    expected = kappa * a + torch.log(kappa / (4 * math.pi * torch.sinh(kappa))) + math.log(4 * math.pi)
    torch.testing.assert_close(kl_divergence(vmf, HypersphericalUniform(d)), expected)
    # Power Spherical on S^2: w has density (kappa + 1) (1 + w)^kappa / 2^{kappa+1}, so
    # KL = log(kappa + 1) - (kappa + 1) log 2 + kappa (log 2 - 1 / (kappa + 1)) + log 2
    ps = PowerSpherical(_e1(d), kappa)
    expected = torch.log(kappa + 1) - (kappa + 1) * math.log(2) + kappa * (math.log(2) - 1 / (kappa + 1)) + math.log(2)
    torch.testing.assert_close(kl_divergence(ps, HypersphericalUniform(d)), expected)


def test_kl_refuses_spheres_of_different_dimension():
    with pytest.raises(ValueError, match="different spheres: q has d = 3, the uniform p d = 4"):
        kl_divergence(VonMisesFisher(_e1(3), 1.0), HypersphericalUniform(4))


# -- gradients -------------------------------------------------------------------------------------


def _expected_cosine_derivative(family: type, d: int, kappa: torch.Tensor) -> torch.Tensor:
    """d E[loc . z] / dkappa: A' = 1 - A^2 - (d - 1) A / kappa (vMF), (d - 1) / (d - 1 + kappa)^2 (Power Spherical)."""
    if family is VonMisesFisher:
        a = mean_resultant_length(d, kappa)
        return 1 - a**2 - (d - 1) * a / kappa
    return (d - 1) / (d - 1 + kappa) ** 2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("d", DIMS)
def test_kappa_gradient_of_the_expected_cosine_matches_the_closed_form(family, d):
    # one kappa per sample (batch (N, 3)), so that autograd gives each sample's pathwise gradient and its spread
    kappa = torch.tensor([0.3, 3.0, 60.0], dtype=DTYPE).expand(N, 3).clone().requires_grad_()
    cosine = family(_e1(d), kappa).rsample()[..., 0]
    (per_sample,) = torch.autograd.grad(cosine.sum(), kappa)
    assert torch.isfinite(per_sample).all()
    _within_monte_carlo_error(per_sample, _expected_cosine_derivative(family, d, kappa.detach()[0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_loc_gradient_of_the_expected_alignment_points_to_the_target(family):
    d, kappa = 10, 5.0
    loc, target = _direction(d, seed=1), _direction(d, seed=2)
    loc.requires_grad_()
    z = family(loc, kappa).rsample((N,))
    (gradient,) = torch.autograd.grad((z * target).sum(-1).mean(), loc)
    # E[target . z] = c(kappa) target . loc: along the sphere its gradient is c (I - loc loc^T) target
    projector = torch.eye(d, dtype=DTYPE) - torch.outer(loc.detach(), loc.detach())
    expected = _expected_cosine(family, d, torch.tensor(kappa, dtype=DTYPE)) * projector @ target
    tangent = projector @ gradient
    assert F.cosine_similarity(tangent, expected, dim=0) > 0.99
    torch.testing.assert_close(tangent, expected, rtol=0, atol=0.02)


def _near_e1(d: int) -> torch.Tensor:
    loc = _e1(d) + 1e-7 * _direction(d, seed=3)
    return loc / loc.norm()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("where", ("e1", "near e1", "-e1"))
@pytest.mark.parametrize("d", (2, 3, 10))
def test_rsample_gradients_are_finite_where_the_householder_reflection_degenerates(family, where, d):
    base = {"e1": _e1(d), "near e1": _near_e1(d), "-e1": _e1(d, -1.0)}[where]
    loc = base.clone().requires_grad_()
    kappa = torch.tensor([0.0, 1.0, 1e4], dtype=DTYPE, requires_grad=True)
    z = family(loc, kappa).rsample((2000,))
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2000, 3, dtype=DTYPE), rtol=0, atol=1e-6)
    target = _direction(d, seed=4)
    gradients = torch.autograd.grad((z * target).sum(), (loc, kappa))
    assert all(torch.isfinite(g).all() for g in gradients)
    # the reflection maps e1 to loc: at kappa 1e4 the samples sit at loc
    torch.testing.assert_close(z[:, 2].mean(0), base, rtol=0, atol=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_rsample_gradients_are_finite_on_the_circle_near_w_plus_minus_one(family):
    # d = 2 at large kappa puts w within 1e-7 of 1, where d sqrt(1 - w^2) / dw is infinite; at kappa 0 w reaches -1
    kappa = torch.tensor([0.0, 1e6, 1e8], dtype=DTYPE, requires_grad=True)
    loc = torch.tensor([0.6, 0.8], dtype=DTYPE, requires_grad=True)
    z = family(loc, kappa).rsample((N,))
    assert (1 - (z[:, 2] * loc).sum(-1)).max() < 1e-6
    gradients = torch.autograd.grad((z * torch.tensor([1.0, -2.0], dtype=DTYPE)).sum(), (loc, kappa))
    assert all(torch.isfinite(g).all() for g in gradients)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_spread_around_loc_survives_float32_at_very_large_kappa(family):
    # on the circle at kappa 1e7, 1 - w ~ 1e-7 is below float32's resolution of w: sqrt(1 - w^2) computed from w
    # would put every sample at loc; E[angle^2] = 2 (1 - E[w]) to O(1 / kappa^2)
    kappa = torch.tensor(1e7)
    z = family(torch.tensor([1.0, 0.0]), kappa).sample((N,))
    angle = torch.atan2(z[:, 1], z[:, 0]).double()
    expected = 2 * (1 - _expected_cosine(family, 2, kappa.double()))
    _within_monte_carlo_error(angle**2, expected)


# -- shapes and argument checks --------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_shapes_broadcast_like_torch(family):
    d = 4
    loc = F.normalize(torch.randn(3, 1, d, dtype=DTYPE), dim=-1)
    kappa = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=DTYPE)
    q = family(loc, kappa)
    assert q.batch_shape == (3, 4) and q.event_shape == (d,)
    z = q.rsample((5,))
    assert z.shape == (5, 3, 4, d)
    assert q.log_prob(z).shape == (5, 3, 4)
    assert q.entropy().shape == (3, 4) and q.mean.shape == (3, 4, d)
    assert kl_divergence(q, HypersphericalUniform(d)).shape == (3, 4)
    # the loc of row i with the kappa of column j
    torch.testing.assert_close(q.log_prob(z)[:, 1, 2], family(loc[1, 0], kappa[2]).log_prob(z[:, 1, 2]))
    expanded = q.expand((2, 3, 4))
    assert expanded.batch_shape == (2, 3, 4) and expanded.sample().shape == (2, 3, 4, d)
    torch.testing.assert_close(expanded.entropy()[1], q.entropy())


@pytest.mark.parametrize("family", FAMILIES)
def test_validate_args_refuses_a_loc_off_the_sphere_and_a_negative_kappa(family):
    with pytest.raises(ValueError, match=r"parameter loc .* UnitSphere\(norm 1 along the last dim; normalise it"):
        family(torch.tensor([1.0, 1.0, 0.0], dtype=DTYPE), 1.0)
    with pytest.raises(ValueError, match=r"parameter scale .* GreaterThanEq\(lower_bound=0.0\)"):
        family(_e1(3), -1.0)
    with pytest.raises(ValueError, match="ambient dimension d; d = 2 is the circle"):
        family(torch.ones(1, dtype=DTYPE), 1.0)
    with pytest.raises(ValueError, match="UnitSphere"):
        family(_e1(3), 1.0).log_prob(torch.tensor([2.0, 0.0, 0.0], dtype=DTYPE))
    # validate_args=False leaves the check to the caller
    family(torch.tensor([1.0, 1.0, 0.0], dtype=DTYPE), 1.0, validate_args=False)


def test_uniform_refuses_a_dimension_below_two():
    with pytest.raises(ValueError, match="dim must be an integer >= 2 .* got 1"):
        HypersphericalUniform(1)


def test_a_non_finite_concentration_gives_nan_samples_instead_of_a_sampler_that_never_accepts():
    """A diverged encoder gives NaN parameters; the models' divergence policy skips such a step, so the sampler
    must return (NaN) rather than raise after its rounds."""
    loc = torch.nn.functional.normalize(torch.ones(3, 4, dtype=torch.float64), dim=-1)
    kappa = torch.tensor([2.0, float("nan"), float("inf")], dtype=torch.float64)
    z = VonMisesFisher(loc, kappa, validate_args=False).rsample()
    assert z[0].isfinite().all() and z[1:].isnan().any(dim=-1).all()
