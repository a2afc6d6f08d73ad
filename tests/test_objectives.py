"""Loss and metric functions of ``dgm_lightning.objectives`` against closed forms and hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, Uniform
from torch.nn import functional as F

from dgm_lightning import objectives
from dgm_lightning.checks import choices
from dgm_lightning.objectives import (
    active_units,
    bits_per_dim,
    free_bits_kl,
    gaussian_kl,
    iwae_bound,
    reconstruction_distribution,
)

DTYPE = torch.float64


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE)


# -- gaussian_kl ---------------------------------------------------------------------------------


def test_gaussian_kl_standard_normal_prior_matches_closed_form():
    mu, sigma = _rand(5, 4), _rand(5, 4).exp()
    kl = gaussian_kl(Normal(mu, sigma), Normal(torch.zeros(4, dtype=DTYPE), torch.ones(4, dtype=DTYPE)))
    expected = 0.5 * (sigma**2 + mu**2 - 1 - torch.log(sigma**2))
    assert kl.shape == (5, 4)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)


def test_gaussian_kl_general_prior_matches_closed_form():
    mu1, s1 = _rand(6, 3), _rand(6, 3).exp()
    mu2, s2 = _rand(3), _rand(3).exp()
    kl = gaussian_kl(Normal(mu1, s1), Normal(mu2, s2))
    expected = torch.log(s2 / s1) + (s1**2 + (mu1 - mu2) ** 2) / (2 * s2**2) - 0.5
    assert kl.shape == (6, 3)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)


def test_gaussian_kl_is_zero_for_identical_distributions():
    mu, sigma = _rand(4, 3), _rand(4, 3).exp()
    torch.testing.assert_close(gaussian_kl(Normal(mu, sigma), Normal(mu, sigma)), torch.zeros(4, 3, dtype=DTYPE))


# -- free_bits_kl --------------------------------------------------------------------------------


def test_free_bits_zero_is_batch_mean_kl_summed():
    kl = _rand(8, 5).abs()
    torch.testing.assert_close(free_bits_kl(kl, 0.0), kl.mean(0).sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(free_bits_kl(kl, 0.0), kl.sum(1).mean(), rtol=1e-12, atol=1e-12)


def test_free_bits_clamps_dims_below_floor():
    # batch means per dim: 0.1, 0.5, 2.0
    kl = torch.tensor([[0.0, 0.4, 1.0], [0.2, 0.6, 3.0]], dtype=DTYPE)
    out = free_bits_kl(kl, 0.3)
    torch.testing.assert_close(out, torch.tensor(0.3 + 0.5 + 2.0, dtype=DTYPE), rtol=1e-12, atol=1e-12)
    # with a floor above every dim, the result is the floor times the number of dims
    torch.testing.assert_close(free_bits_kl(kl, 5.0), torch.tensor(15.0, dtype=DTYPE))


def test_free_bits_gradient_zero_below_floor_nonzero_above():
    kl = torch.tensor([[0.0, 0.4, 1.0], [0.2, 0.6, 3.0]], dtype=DTYPE, requires_grad=True)
    free_bits_kl(kl, 0.3).backward()
    grad = kl.grad
    assert torch.all(grad[:, 0] == 0), "a dim below the floor must get no gradient"
    torch.testing.assert_close(grad[:, 1:], torch.full((2, 2), 0.5, dtype=DTYPE))


# -- iwae_bound ----------------------------------------------------------------------------------


def test_iwae_identical_weights_give_that_value():
    value = torch.tensor([-3.5, 0.25, 12.0], dtype=DTYPE)
    log_w = value.expand(7, 3).clone()
    torch.testing.assert_close(iwae_bound(log_w), value, rtol=1e-12, atol=1e-12)


def test_iwae_equals_hand_log_mean_exp():
    log_w = _rand(5, 4)
    expected = torch.log(log_w.exp().mean(0))
    out = iwae_bound(log_w)
    assert out.shape == (4,)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # a single example worked through by hand: log((e^0 + e^{log 3}) / 2) = log 2
    torch.testing.assert_close(
        iwae_bound(torch.tensor([[0.0], [math.log(3.0)]], dtype=DTYPE)),
        torch.tensor([math.log(2.0)], dtype=DTYPE),
    )


def test_iwae_single_sample_is_the_weight():
    log_w = _rand(1, 6)
    torch.testing.assert_close(iwae_bound(log_w), log_w[0], rtol=1e-12, atol=1e-12)


def test_iwae_at_least_mean_log_weight_jensen():
    log_w = 3 * _rand(10, 50)
    assert torch.all(iwae_bound(log_w) >= log_w.mean(0))


def test_iwae_stable_for_very_negative_weights():
    log_w = torch.full((4, 2), -1e4, dtype=DTYPE)
    torch.testing.assert_close(iwae_bound(log_w), torch.full((2,), -1e4, dtype=DTYPE))


# -- bits_per_dim --------------------------------------------------------------------------------


def test_bits_per_dim_uniform_unit_cube_is_zero():
    d = 12
    x = torch.rand(3, d, dtype=DTYPE)
    nll = -Uniform(torch.zeros(d, dtype=DTYPE), torch.ones(d, dtype=DTYPE)).log_prob(x).sum(-1)
    torch.testing.assert_close(bits_per_dim(nll, d), torch.zeros(3, dtype=DTYPE))


def test_bits_per_dim_uniform_half_interval_is_minus_one():
    d = 10
    x = 0.5 * torch.rand(4, d, dtype=DTYPE)
    nll = -Uniform(torch.zeros(d, dtype=DTYPE), torch.full((d,), 0.5, dtype=DTYPE)).log_prob(x).sum(-1)
    torch.testing.assert_close(nll, torch.full((4,), -d * math.log(2.0), dtype=DTYPE))
    torch.testing.assert_close(bits_per_dim(nll, d), torch.full((4,), -1.0, dtype=DTYPE), rtol=1e-12, atol=1e-12)


def test_bits_per_dim_one_bit_per_dim():
    d = 784
    nll = torch.tensor([d * math.log(2.0)], dtype=DTYPE)
    torch.testing.assert_close(bits_per_dim(nll, d), torch.tensor([1.0], dtype=DTYPE))


# -- active_units --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_active_units_counts_dims_with_variance_above_threshold(k):
    n, d = 200, 5
    means = torch.full((n, d), 0.7, dtype=DTYPE)
    means[:, :k] = torch.randn(n, k, dtype=DTYPE)  # variance about 1
    if k < d:
        means[:, k] += 0.01 * torch.randn(n, dtype=DTYPE)  # variance about 1e-4: inactive
    assert int(active_units(means)) == k


def test_active_units_threshold_is_strict_and_configurable():
    # column variances (unbiased, N=2): 0.5 * (a - b)^2
    means = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.2, 2.0]], dtype=DTYPE)  # variances 0.5, 0.02, 2.0
    assert int(active_units(means)) == 3
    assert int(active_units(means, threshold=0.1)) == 2
    assert int(active_units(means, threshold=1.0)) == 1
    assert int(active_units(means, threshold=2.0)) == 0


@pytest.mark.parametrize("n", [0, 1])
def test_active_units_needs_two_rows(n):
    with pytest.raises(ValueError, match="at least 2"):
        active_units(torch.zeros(n, 3))


# -- reconstruction_distribution -----------------------------------------------------------------

SHAPE = (3, 2, 4, 5)  # (B, C, H, W)


@pytest.mark.parametrize("likelihood", choices(objectives.Likelihood))
def test_reconstruction_distribution_shapes(likelihood):
    params = _rand(*SHAPE)
    dist = reconstruction_distribution(likelihood, params, log_scale=torch.tensor(-1.0, dtype=DTYPE))
    assert dist.event_shape == SHAPE[1:]
    assert dist.batch_shape == SHAPE[:1]
    x = torch.rand(*SHAPE, dtype=DTYPE)
    lp = dist.log_prob(x)
    assert lp.shape == SHAPE[:1]
    assert torch.isfinite(lp).all()


def test_bernoulli_log_prob_is_negative_bce_with_logits():
    logits, x = _rand(*SHAPE), torch.rand(*SHAPE, dtype=DTYPE)  # grey levels, not only 0/1
    lp = reconstruction_distribution("bernoulli", logits).log_prob(x)
    expected = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
    torch.testing.assert_close(lp, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian_learned"])
def test_gaussian_log_prob_matches_hand_density(likelihood):
    mean, x = _rand(*SHAPE), _rand(*SHAPE)
    log_scale = torch.tensor(-0.7, dtype=DTYPE)
    lp = reconstruction_distribution(likelihood, mean, log_scale=log_scale).log_prob(x)
    sigma = log_scale.exp()
    per_pixel = -0.5 * ((x - mean) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(lp, per_pixel.sum((1, 2, 3)), rtol=1e-12, atol=1e-12)


def test_gaussian_mean_is_params():
    mean = _rand(*SHAPE)
    dist = reconstruction_distribution("gaussian", mean, log_scale=torch.tensor(0.0, dtype=DTYPE))
    torch.testing.assert_close(dist.mean, mean)


def test_continuous_bernoulli_is_bernoulli_plus_log_normaliser():
    # logits well away from 0 (lambda away from 0.5, where torch switches to a Taylor expansion)
    sign = torch.where(torch.rand(*SHAPE) < 0.5, -1.0, 1.0).to(DTYPE)
    logits = sign * (0.5 + 2 * torch.rand(*SHAPE, dtype=DTYPE))
    x = torch.rand(*SHAPE, dtype=DTYPE)
    lam = torch.sigmoid(logits)
    log_c = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))
    bern = reconstruction_distribution("bernoulli", logits).log_prob(x)
    cb = reconstruction_distribution("continuous_bernoulli", logits).log_prob(x)
    torch.testing.assert_close(cb, bern + log_c.sum((1, 2, 3)), rtol=1e-10, atol=1e-10)


def test_continuous_bernoulli_normaliser_is_positive():
    """C(lambda) >= 2 everywhere, so the continuous Bernoulli log-likelihood exceeds the Bernoulli one."""
    logits, x = 3 * _rand(*SHAPE), torch.rand(*SHAPE, dtype=DTYPE)
    bern = reconstruction_distribution("bernoulli", logits).log_prob(x)
    cb = reconstruction_distribution("continuous_bernoulli", logits).log_prob(x)
    assert torch.all(cb - bern >= math.log(2.0) * math.prod(SHAPE[1:]) - 1e-9)


def test_unknown_likelihood_lists_choices():
    with pytest.raises(ValueError, match="poisson") as info:
        reconstruction_distribution("poisson", _rand(*SHAPE))
    for name in choices(objectives.Likelihood):
        assert name in str(info.value)


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian_learned"])
def test_gaussian_without_log_scale_raises(likelihood):
    with pytest.raises(ValueError, match="log_scale"):
        reconstruction_distribution(likelihood, _rand(*SHAPE))


def test_elbo_terms_assemble_the_vae_objective():
    reconstruction = torch.tensor([-10.0, -12.0])
    kl = torch.tensor([[0.5, 0.05], [1.5, 0.15]])  # (B, D)
    terms = objectives.elbo_terms(reconstruction, kl, beta=2.0, free_bits=0.2)
    assert terms["kl"].item() == pytest.approx(1.1)  # mean over examples of the summed KL
    assert terms["elbo"].item() == pytest.approx(-11.0 - 1.1)
    assert terms["reconstruction"].item() == pytest.approx(-11.0)
    # free bits floor the second dimension's batch-mean KL (0.1) at 0.2: 2 * (1.0 + 0.2)
    assert terms["loss"].item() == pytest.approx(11.0 + 2.0 * 1.2)
    monte_carlo = objectives.elbo_terms(reconstruction, kl.sum(1), beta=2.0)
    assert monte_carlo["loss"].item() == pytest.approx(11.0 + 2.0 * 1.1)
    with pytest.raises(ValueError, match="free bits need the KL per latent dimension"):
        objectives.elbo_terms(reconstruction, kl.sum(1), free_bits=0.2)
