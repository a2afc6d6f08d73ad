"""The VAE objectives beyond the ELBO (IWAE/MIWAE, beta-TC, MMD) against closed forms and Monte Carlo references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from dgm_lightning.checks import choices
from dgm_lightning.objectives import (
    Kernel,
    beta_tc_terms,
    elbo_terms,
    iwae_bound,
    iwae_terms,
    miwae_terms,
    mmd,
    mmd_terms,
    piwae_terms,
)

DTYPE = torch.float64


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE)


# -- IWAE and MIWAE ------------------------------------------------------------------------------


def _toy_log_terms(x: torch.Tensor, num_samples: int, replicates: int) -> tuple[torch.Tensor, ...]:
    """log p(x|z), log p(z), log q(z|x), each (num_samples, replicates, B), for p(z) = N(0, 1), p(x|z) = N(z, 1)
    (so p(x) = N(0, 2) and p(z|x) = N(x/2, 1/2)) and q(z|x) = N(x/2 + 0.4, 1), deliberately off (wider, shifted)."""
    q = Normal(0.5 * x + 0.4, torch.ones_like(x))
    z = q.sample((num_samples, replicates))
    return Normal(z, 1.0).log_prob(x), Normal(0.0, 1.0).log_prob(z), q.log_prob(z)


def test_iwae_with_one_sample_is_the_elbo_exactly():
    log_px, log_pz, log_q = _rand(1, 6), _rand(1, 6), _rand(1, 6)
    kl = log_q[0] - log_pz[0]
    for beta in (1.0, 0.3):
        terms, reference = iwae_terms(log_px, log_pz, log_q, beta=beta), elbo_terms(log_px[0], kl, beta=beta)
        for name in ("elbo", "reconstruction", "kl"):
            assert torch.equal(terms[name], reference[name]), name
        assert torch.equal(terms["iwae"], reference["elbo"])
        torch.testing.assert_close(terms["loss"], reference["loss"], rtol=0, atol=1e-12)


def test_iwae_beta_weights_the_kl_part_of_each_log_weight():
    log_px, log_pz, log_q = _rand(5, 4), _rand(5, 4), _rand(5, 4)
    terms = iwae_terms(log_px, log_pz, log_q, beta=0.25)
    expected = -(torch.logsumexp(log_px + 0.25 * (log_pz - log_q), 0) - math.log(5)).mean()
    torch.testing.assert_close(terms["loss"], expected, rtol=0, atol=1e-12)
    # iwae and elbo stay the plain (beta = 1) values, and beta = 1 makes the loss the negative bound
    torch.testing.assert_close(terms["iwae"], iwae_bound(log_px + log_pz - log_q).mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(terms["elbo"], (log_px + log_pz - log_q).mean(), rtol=0, atol=1e-12)
    plain = iwae_terms(log_px, log_pz, log_q)
    assert torch.equal(plain["loss"], -plain["iwae"])


def test_iwae_bound_rises_with_k_towards_log_px_on_a_gaussian_model():
    x = torch.tensor([-1.5, 0.3, 2.0], dtype=DTYPE)
    log_px_true = Normal(0.0, math.sqrt(2.0)).log_prob(x).mean()
    replicates, ks = 4000, (1, 2, 4, 16, 64, 256)
    log_px, log_pz, log_q = _toy_log_terms(x, max(ks), replicates)
    # the bounds of the first k of the same 256 samples per replicate: paired, so their differences are precise
    bounds = {}
    for k in ks:
        bounds[k] = iwae_bound((log_px + log_pz - log_q)[:k]).mean(-1)  # (replicates,)
        terms = iwae_terms(*(t[:k].flatten(1) for t in (log_px, log_pz, log_q)))
        torch.testing.assert_close(terms["iwae"], bounds[k].mean(), rtol=0, atol=1e-12)
    se = {k: b.std() / math.sqrt(replicates) for k, b in bounds.items()}
    for small, large in zip(ks[:-1], ks[1:], strict=True):
        gain = bounds[large] - bounds[small]
        assert gain.mean() > -3 * gain.std() / math.sqrt(replicates), (small, large)
    assert (bounds[2] - bounds[1]).mean() > 0.1, "K = 2 must be clearly tighter than the ELBO here (gap 0.30 nats)"
    assert all(bounds[k].mean() < log_px_true + 3 * se[k] for k in ks), "no bound may exceed log p(x)"
    assert log_px_true - bounds[1].mean() > 0.25  # the ELBO's gap, KL(q || p(z|x)) = 0.30 nats on average
    assert log_px_true - bounds[256].mean() < 0.005  # 0.0007 measured: the O(1/K) bias, a few standard errors


def test_miwae_with_one_group_is_the_iwae_and_with_groups_of_one_the_elbo():
    log_px, log_pz, log_q = _rand(6, 4), _rand(6, 4), _rand(6, 4)
    for beta in (1.0, 0.5):
        one_group = miwae_terms(log_px, log_pz, log_q, num_groups=1, beta=beta)
        iwae = iwae_terms(log_px, log_pz, log_q, beta=beta)
        torch.testing.assert_close(one_group["loss"], iwae["loss"], rtol=0, atol=1e-12)
        torch.testing.assert_close(one_group["miwae"], iwae["iwae"], rtol=0, atol=1e-12)
        singles = miwae_terms(log_px, log_pz, log_q, num_groups=6, beta=beta)
        torch.testing.assert_close(singles["miwae"], iwae["elbo"], rtol=0, atol=1e-12)
        expected_loss = -(log_px - beta * (log_q - log_pz)).mean()
        torch.testing.assert_close(singles["loss"], expected_loss, rtol=0, atol=1e-12)


def test_miwae_averages_the_iwae_bounds_of_consecutive_groups_and_lies_between_elbo_and_iwae():
    log_px, log_pz, log_q = _rand(6, 5), _rand(6, 5), _rand(6, 5)
    log_w = log_px + log_pz - log_q
    terms = miwae_terms(log_px, log_pz, log_q, num_groups=3)
    by_hand = torch.stack([iwae_bound(log_w[2 * m : 2 * m + 2]) for m in range(3)]).mean(0).mean()
    torch.testing.assert_close(terms["miwae"], by_hand, rtol=0, atol=1e-12)
    # log-mean-exp is at least the mean and at most the log-mean-exp of all samples: true of every draw
    assert terms["elbo"] < terms["miwae"] < terms["iwae"]


def test_piwae_is_the_iwae_in_value_and_gives_each_set_of_weights_the_gradient_of_its_own_bound():
    # two copies of the same log weights, one per set of networks: the loss's gradient in the generative copy is the
    # IWAE's, in the inference copy the MIWAE's, and its value the IWAE loss
    leaves = [_rand(6, 4).requires_grad_() for _ in range(3)]
    copies = [leaf.clone().detach().requires_grad_() for leaf in leaves]
    for beta in (1.0, 0.5):
        terms = piwae_terms(tuple(leaves), tuple(copies), num_groups=3, beta=beta)
        iwae = iwae_terms(*leaves, beta=beta)
        miwae = miwae_terms(*copies, num_groups=3, beta=beta)
        torch.testing.assert_close(terms["loss"], iwae["loss"], rtol=0, atol=1e-12)
        torch.testing.assert_close(terms["miwae"], miwae["miwae"], rtol=0, atol=1e-12)
        got = torch.autograd.grad(terms["loss"], [*leaves, *copies])
        expected = torch.autograd.grad(iwae["loss"], leaves) + torch.autograd.grad(miwae["loss"], copies)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_importance_terms_refuse_bad_shapes_and_groups():
    log_px = _rand(6, 4)
    with pytest.raises(ValueError, match=r"share one shape \(num_samples, batch\), got \(6, 4\), \(6, 3\)"):
        iwae_terms(log_px, _rand(6, 3), _rand(6, 4))
    with pytest.raises(ValueError, match=r"num_groups \(4\) must divide the number of importance samples \(6\)"):
        miwae_terms(log_px, log_px, log_px, num_groups=4)
    with pytest.raises(ValueError, match="num_groups must be a positive integer, got 0"):
        miwae_terms(log_px, log_px, log_px, num_groups=0)


# -- beta-TC -------------------------------------------------------------------------------------


def _gaussian_population(mixing: torch.Tensor, sigma: float, batch: int) -> tuple[torch.Tensor, Normal, dict]:
    """Posteriors q(z|x) = N(A u, sigma^2 I) with u ~ N(0, I) per example, one z each, and the closed-form terms of
    their aggregate q(z) = N(0, A A^T + sigma^2 I) against a standard normal prior."""
    loc = _rand(batch, mixing.shape[1]) @ mixing.T
    q = Normal(loc, torch.full_like(loc, sigma))
    dim = mixing.shape[0]
    cov = mixing @ mixing.T + sigma**2 * torch.eye(dim, dtype=DTYPE)
    var = cov.diagonal()
    reference = {
        "tc": 0.5 * var.log().sum() - 0.5 * torch.logdet(cov),
        "mi": 0.5 * torch.logdet(cov) - dim * math.log(sigma),
        "dim_kl": (0.5 * (var - 1 - var.log())).sum(),
    }
    return q.sample(), q, reference


def test_beta_tc_independent_factors_give_tc_near_zero_and_correlated_ones_clearly_more():
    independent = torch.diag(torch.tensor([1.0, 0.5, 2.0], dtype=DTYPE))
    correlated = torch.ones(3, 1, dtype=DTYPE)  # one factor drives all three dimensions: TC 1.13 nats
    tc = {}
    for name, mixing in (("independent", independent), ("correlated", correlated)):
        z, q, reference = _gaussian_population(mixing, 0.5, 1000)
        terms = beta_tc_terms(z, q, torch.zeros(1000, dtype=DTYPE), dataset_size=10**6)
        tc[name] = terms["tc"]
        assert abs(terms["tc"] - reference["tc"]) < 0.15, (name, terms["tc"], reference["tc"])
        # MI and dimension-wise KL carry the single-sample noise of log q(z|x) - log p(z): looser
        assert abs(terms["mi"] - reference["mi"]) < 0.3 and abs(terms["dim_kl"] - reference["dim_kl"]) < 0.3
    assert abs(tc["independent"]) < 0.1  # -0.02 measured; the default MWS estimator gave 27.6 = (D - 1) log N
    assert tc["correlated"] > 0.9


@pytest.mark.parametrize("estimator", ["mss", "mws"])
def test_beta_tc_terms_of_a_posterior_that_ignores_x_match_hand_values(estimator):
    # every q(z|x_j) is the same N(m, s^2): the aggregate is that Gaussian, so MI = TC = 0 and dim_kl = KL; MWS
    # weights the batch by 1/(N B) and is off by log N per log density, exactly
    batch, dim, n = 50, 4, 1000
    q = Normal(_rand(dim).expand(batch, dim), _rand(dim).exp().expand(batch, dim))
    z = q.sample()
    terms = beta_tc_terms(z, q, _rand(batch), dataset_size=n, estimator=estimator)
    log_n = math.log(n) if estimator == "mws" else 0.0
    torch.testing.assert_close(terms["mi"], torch.tensor(log_n, dtype=DTYPE), rtol=0, atol=1e-10)
    torch.testing.assert_close(terms["tc"], torch.tensor((dim - 1) * log_n, dtype=DTYPE), rtol=0, atol=1e-10)
    torch.testing.assert_close(terms["dim_kl"], terms["kl"] - dim * log_n, rtol=0, atol=1e-10)


@pytest.mark.parametrize("estimator", ["mss", "mws"])
def test_beta_tc_terms_add_up_to_the_kl_and_unit_weights_give_the_elbo(estimator):
    q = Normal(_rand(16, 5), _rand(16, 5).exp())
    z, log_px = q.sample(), _rand(16)
    terms = beta_tc_terms(z, q, log_px, dataset_size=500, estimator=estimator)
    kl = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1).mean()
    torch.testing.assert_close(terms["kl"], kl, rtol=0, atol=1e-12)
    torch.testing.assert_close(terms["mi"] + terms["tc"] + terms["dim_kl"], kl, rtol=0, atol=1e-10)
    torch.testing.assert_close(terms["loss"], -(log_px.mean() - kl), rtol=0, atol=1e-10)
    torch.testing.assert_close(terms["elbo"], log_px.mean() - kl, rtol=0, atol=1e-12)
    weighted = beta_tc_terms(z, q, log_px, dataset_size=500, alpha=0.5, beta=6.0, gamma=2.0, estimator=estimator)
    expected = -(log_px.mean() - 0.5 * terms["mi"] - 6.0 * terms["tc"] - 2.0 * terms["dim_kl"])
    torch.testing.assert_close(weighted["loss"], expected, rtol=0, atol=1e-10)


def test_beta_tc_takes_the_prior_per_dimension_or_per_example():
    q = Normal(_rand(8, 3), _rand(8, 3).exp())
    z, log_px = q.sample(), _rand(8)
    prior = Normal(torch.tensor([0.5, -1.0, 0.0], dtype=DTYPE), torch.tensor([2.0, 1.0, 0.5], dtype=DTYPE))
    per_dim = beta_tc_terms(z, q, log_px, dataset_size=100, log_pz=prior.log_prob(z))
    per_example = beta_tc_terms(z, q, log_px, dataset_size=100, log_pz=prior.log_prob(z).sum(-1))
    standard = beta_tc_terms(z, q, log_px, dataset_size=100)
    for name, value in per_dim.items():
        torch.testing.assert_close(per_example[name], value, rtol=0, atol=1e-12)
    torch.testing.assert_close(per_dim["mi"], standard["mi"], rtol=0, atol=1e-12)  # MI and TC ignore the prior
    expected_kl = (q.log_prob(z) - prior.log_prob(z)).sum(-1).mean()
    torch.testing.assert_close(per_dim["kl"], expected_kl, rtol=0, atol=1e-12)
    assert not torch.allclose(per_dim["kl"], standard["kl"])


def test_beta_tc_refuses_bad_input():
    q = Normal(_rand(8, 3), _rand(8, 3).exp())
    z, log_px = q.sample(), _rand(8)
    with pytest.raises(ValueError, match=r"dataset_size \(4\) must be at least the batch size \(8\)"):
        beta_tc_terms(z, q, log_px, dataset_size=4)
    with pytest.raises(ValueError, match="unknown TC estimator 'nws'; choose one of: mws, mss"):
        beta_tc_terms(z, q, log_px, dataset_size=100, estimator="nws")
    with pytest.raises(ValueError, match=r"B >= 2 .* got z \(1, 3\)"):
        single = Normal(_rand(1, 3), _rand(1, 3).exp())
        beta_tc_terms(single.sample(), single, log_px[:1], dataset_size=100)
    with pytest.raises(ValueError, match=r"log_pz must have shape \(8, 3\) or \(8,\), got \(8, 2\)"):
        beta_tc_terms(z, q, log_px, dataset_size=100, log_pz=_rand(8, 2))
    with pytest.raises(ValueError, match=r"log_px must have shape \(8,\)"):
        beta_tc_terms(z, q, _rand(8, 1), dataset_size=100)


# -- MMD -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", choices(Kernel))
def test_mmd_matches_the_kernel_formulas_on_two_points_each(kernel):
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=DTYPE)
    y = torch.tensor([[0.0, 1.0], [2.0, 2.0]], dtype=DTYPE)
    scale = 4.0  # the default 2 D
    if kernel == "imq":
        k = lambda r: scale / (scale + r)  # noqa: E731
    else:
        k = lambda r: math.exp(-r / scale)  # noqa: E731
    # squared distances: x1-x2 1, y1-y2 5; cross x1-y1 1, x1-y2 8, x2-y1 2, x2-y2 5
    expected = k(1) + k(5) - 2 * (k(1) + k(8) + k(2) + k(5)) / 4
    torch.testing.assert_close(mmd(x, y, kernel=kernel), torch.tensor(expected, dtype=DTYPE), rtol=0, atol=1e-12)
    torch.testing.assert_close(mmd(x, y, kernel=kernel, scale=4.0), mmd(x, y, kernel=kernel), rtol=0, atol=0)


@pytest.mark.parametrize("kernel", choices(Kernel))
def test_mmd_is_near_zero_for_one_distribution_clearly_positive_for_two_and_symmetric(kernel):
    same = mmd(_rand(500, 4), _rand(500, 4), kernel=kernel)
    different = mmd(_rand(500, 4), _rand(400, 4) + 1.0, kernel=kernel)
    assert abs(same) < 0.005  # its standard deviation is 0.0007 (IMQ) and 0.0009 (RBF) here
    assert different > 0.1  # 0.20 (IMQ) and 0.25 (RBF)
    x, y = _rand(30, 3), _rand(20, 3) * 2
    torch.testing.assert_close(mmd(x, y, kernel=kernel), mmd(y, x, kernel=kernel), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", choices(Kernel))
def test_mmd_of_a_sample_with_itself_is_the_documented_small_negative_value(kernel):
    x = _rand(40, 3)
    value = mmd(x, x, kernel=kernel)
    squared = (x[:, None] - x[None]).pow(2).sum(-1)
    matrix = 6.0 / (6.0 + squared) if kernel == "imq" else torch.exp(-squared / 6.0)
    off_diagonal_mean = (matrix.sum() - 40) / (40 * 39)
    torch.testing.assert_close(value, -(2 / 40) * (1 - off_diagonal_mean), rtol=0, atol=1e-12)
    assert value < 0


def test_mmd_refuses_unknown_kernels_bad_scales_and_shapes():
    x = _rand(5, 3)
    with pytest.raises(ValueError, match="unknown kernel 'gauss'; choose one of: imq, rbf"):
        mmd(x, x, kernel="gauss")
    with pytest.raises(ValueError, match="scale must be > 0 and finite, got 0.0"):
        mmd(x, x, scale=0.0)
    with pytest.raises(ValueError, match=r"shapes \(N, D\) and \(M, D\) with N, M >= 2, got \(5, 3\) and \(5, 2\)"):
        mmd(x, _rand(5, 2))


def test_mmd_terms_weigh_the_mmd_and_the_optional_infovae_kl():
    z, prior_samples, log_px, kl = _rand(10, 2), _rand(12, 2), _rand(10), _rand(10, 2).abs()
    wae = mmd_terms(z, log_px, prior_samples=prior_samples, weight=3.0, kernel="rbf")
    discrepancy = mmd(z, prior_samples, kernel="rbf")
    assert set(wae) == {"loss", "reconstruction", "mmd"}
    torch.testing.assert_close(wae["loss"], -log_px.mean() + 3.0 * discrepancy, rtol=0, atol=1e-12)
    info = mmd_terms(z, log_px, prior_samples=prior_samples, weight=3.0, kl=kl, kl_weight=0.5, kernel="rbf")
    torch.testing.assert_close(info["loss"], wae["loss"] + 0.5 * kl.sum(1).mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(info["elbo"], log_px.mean() - kl.sum(1).mean(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="kl_weight is 0.5 but no kl was given"):
        mmd_terms(z, log_px, prior_samples=prior_samples, kl_weight=0.5)
