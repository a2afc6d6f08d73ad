"""Priors (standard normal, learned mixture, VampPrior) and the post-hoc FittedMixture against hand computations,
quadrature, Monte Carlo and scikit-learn's GaussianMixture, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal
from torch.nn import functional as F

from dgm_lightning.checks import choices
from dgm_lightning.fitted_mixture import FittedMixture
from dgm_lightning.priors import (
    MixturePrior,
    Prior,
    StandardNormalPrior,
    VampPrior,
    build_prior,
    check_prior_supports,
)

DTYPE = torch.float64


class LinearEncoder(nn.Module):
    """A tiny encoder: inputs (K, *shape) -> loc (K, D) and scale (K, D), both linear in the inputs (scale via
    softplus, floored so that the components stay proper)."""

    def __init__(self, in_features: int, latent_dim: int) -> None:
        super().__init__()
        self.loc = nn.Linear(in_features, latent_dim)
        self.scale = nn.Linear(in_features, latent_dim)

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = u.flatten(1)
        return self.loc(flat), F.softplus(self.scale(flat)) + 0.2


def _vamp(latent_dim: int = 2, k: int = 3, data_shape=(1, 2, 2), **kwargs) -> tuple[VampPrior, LinearEncoder]:
    encoder = LinearEncoder(math.prod(data_shape), latent_dim).to(DTYPE)
    return VampPrior(latent_dim, k, data_shape, encoder, **kwargs).to(DTYPE), encoder


def _integral_1d(prior) -> float:
    """The integral of exp(log_prob) over the real line (D = 1) by the trapezoid rule on [-30, 30]."""
    z = torch.linspace(-30, 30, 60001, dtype=DTYPE)
    return torch.trapezoid(prior.log_prob(z[:, None]).exp(), z).item()


def _mixture(latent_dim: int, k: int) -> MixturePrior:
    prior = MixturePrior(latent_dim, k).to(DTYPE)
    with torch.no_grad():
        prior.logits.copy_(torch.randn(k, dtype=DTYPE))
        prior.log_scale.copy_(0.5 * torch.randn(k, latent_dim, dtype=DTYPE))
    return prior


# -- the priors --------------------------------------------------------------------------------


def test_standard_normal_log_prob_matches_closed_form_and_moves_with_the_model():
    prior = StandardNormalPrior(3).to(DTYPE)
    z = torch.randn(4, 5, 3, dtype=DTYPE)
    expected = -0.5 * z.square().sum(-1) - 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(prior.log_prob(z), expected, rtol=1e-12, atol=1e-12)
    assert prior.sample((7,)).dtype == DTYPE  # the buffers moved with .to()
    assert set(prior.state_dict()) == {"loc", "scale"}
    assert StandardNormalPrior.closed_form_kl and not MixturePrior.closed_form_kl and not VampPrior.closed_form_kl


def test_mixture_prior_with_one_standard_component_equals_the_standard_normal():
    prior = MixturePrior(4, 1).to(DTYPE)
    with torch.no_grad():
        prior.loc.zero_()
        prior.log_scale.zero_()
    z = 3 * torch.randn(10, 4, dtype=DTYPE)
    assert torch.equal(prior.log_prob(z), StandardNormalPrior(4).to(DTYPE).log_prob(z))


def test_mixture_prior_log_prob_matches_hand_computation():
    prior = _mixture(2, 3)
    z = torch.randn(6, 5, 2, dtype=DTYPE)  # (samples, batch, D)
    per_component = Normal(prior.loc, prior.log_scale.exp()).log_prob(z[..., None, :]).sum(-1)  # (6, 5, K)
    expected = (per_component + prior.logits.log_softmax(0)).logsumexp(-1)
    torch.testing.assert_close(prior.log_prob(z), expected, rtol=1e-12, atol=1e-12)


def test_mixture_prior_normalises():
    assert _integral_1d(_mixture(1, 4)) == pytest.approx(1.0, abs=1e-8)
    # D = 2 by importance sampling from a wide Gaussian: E_q[p(z) / q(z)] = 1
    prior = _mixture(2, 3)
    proposal = torch.distributions.Independent(Normal(torch.zeros(2, dtype=DTYPE), 4 * torch.ones(2, dtype=DTYPE)), 1)
    z = proposal.sample((200_000,))
    ratio = (prior.log_prob(z) - proposal.log_prob(z)).exp()
    assert ratio.mean().item() == pytest.approx(1.0, abs=4 * ratio.std().item() / math.sqrt(z.shape[0]))


def test_vamp_prior_log_prob_is_the_uniform_mixture_of_the_pseudo_posteriors():
    prior, encoder = _vamp(latent_dim=2, k=3)
    loc, scale = encoder(prior.pseudo_inputs)
    z = torch.randn(4, 5, 2, dtype=DTYPE)
    per_component = Normal(loc, scale).log_prob(z[..., None, :]).sum(-1)  # (4, 5, K)
    expected = per_component.logsumexp(-1) - math.log(3)
    torch.testing.assert_close(prior.log_prob(z), expected, rtol=1e-12, atol=1e-12)
    assert _integral_1d(_vamp(latent_dim=1, k=5)[0]) == pytest.approx(1.0, abs=1e-8)


def test_sample_shapes_and_mixture_sample_mean():
    for prior in (StandardNormalPrior(3), MixturePrior(3, 4), _vamp(latent_dim=3)[0]):
        assert prior.sample((7,)).shape == (7, 3)
        assert prior.sample((2, 5)).shape == (2, 5, 3)
        assert prior.log_prob(torch.zeros(2, 5, 3, dtype=prior.sample().dtype)).shape == (2, 5)
    prior = _mixture(2, 3)
    expected = prior.logits.softmax(0) @ prior.loc
    draws = prior.sample((100_000,))
    torch.testing.assert_close(draws.mean(0), expected.detach(), atol=0.03, rtol=0)


def test_log_prob_refuses_codes_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"latent_dim=3.*\(4, 2\)"):
        MixturePrior(3, 2).log_prob(torch.zeros(4, 2))


def test_vamp_prior_gradients_reach_the_pseudo_inputs_and_the_encoder():
    prior, encoder = _vamp(latent_dim=2, k=3)
    (-prior.log_prob(torch.randn(8, 2, dtype=DTYPE)).sum()).backward()
    assert prior.pseudo_logits.grad is not None and prior.pseudo_logits.grad.abs().min() > 0
    for parameter in encoder.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_vamp_prior_state_dict_holds_only_the_pseudo_inputs():
    prior, encoder = _vamp()
    assert list(prior.state_dict()) == ["pseudo_logits"]
    model = nn.Module()  # what a VAE will hold: the encoder once, the prior with its pseudo-inputs
    model.encoder, model.prior = encoder, prior
    assert sorted(model.state_dict()) == sorted(
        ["prior.pseudo_logits"] + [f"encoder.{name}" for name in encoder.state_dict()]
    )
    assert len(list(model.parameters())) == 1 + len(list(encoder.parameters()))


def test_vamp_pseudo_inputs_stay_in_the_value_range():
    prior, _ = _vamp(value_range=(-1.0, 2.0), k=50)
    inputs = prior.pseudo_inputs
    assert inputs.min() > -1 and inputs.max() < 2 and inputs.std() > 0.5  # spread over the range
    with torch.no_grad():
        prior.pseudo_logits.copy_(1e3 * torch.randn_like(prior.pseudo_logits))  # as after huge optimizer steps
    assert prior.pseudo_inputs.min() >= -1 and prior.pseudo_inputs.max() <= 2


def test_vamp_pseudo_inputs_from_examples():
    examples = torch.rand(3, 1, 2, 2, dtype=DTYPE).round()  # binarized: on the bounds
    prior, _ = _vamp(k=3, init=examples)
    torch.testing.assert_close(prior.pseudo_inputs, 0.01 + 0.98 * examples, rtol=0, atol=1e-6)  # logits in float32
    with pytest.raises(ValueError, match=r"shape \(num_pseudo_inputs, \*data_shape\) = \(3, 1, 2, 2\), got \(2, 4\)"):
        _vamp(k=3, init=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"value_range \(0.0, 1.0\).*\[0, 3\]"):
        _vamp(k=3, init=3 * examples)
    with pytest.raises(ValueError, match="init must be 'uniform' or a tensor"):
        _vamp(init="normal")


def test_vamp_prior_refuses_an_encoder_of_the_wrong_size():
    prior = VampPrior(3, 4, (1, 2, 2), LinearEncoder(4, 2))
    with pytest.raises(ValueError, match=r"\(num_pseudo_inputs, latent_dim\) = \(4, 3\), got \(4, 2\)"):
        prior.sample((1,))


def test_build_prior_builds_each_choice_and_refuses_unknown_names():
    encoder = LinearEncoder(4, 2)
    kinds = {"standard_normal": StandardNormalPrior, "mixture": MixturePrior, "vamp": VampPrior}
    assert set(kinds) == set(choices(Prior))
    for name, kind in kinds.items():
        prior = build_prior(name, 2, num_components=3, num_pseudo_inputs=5, data_shape=(1, 2, 2), encode=encoder)
        assert type(prior) is kind and prior.latent_dim == 2
    assert build_prior("mixture", 2, num_components=3).loc.shape == (3, 2)
    with pytest.raises(ValueError, match="unknown prior 'gaussian'; choose one of: standard_normal, mixture, vamp"):
        build_prior("gaussian", 2)
    with pytest.raises(ValueError, match="vamp prior needs data_shape and encode"):
        build_prior("vamp", 2)


def test_check_prior_supports_refuses_the_vamp_prior_with_labels():
    with pytest.raises(ValueError, match="vamp prior is unconditional, but num_classes is 10"):
        check_prior_supports("vamp", num_classes=10)
    check_prior_supports("vamp", num_classes=None)
    check_prior_supports("mixture", num_classes=10)
    with pytest.raises(ValueError, match="unknown prior 'gmm'"):
        check_prior_supports("gmm", num_classes=None)


# -- the fitted mixture ------------------------------------------------------------------------

WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE)
MEANS = torch.tensor([[-6.0, 0.0], [4.0, 4.0], [4.0, -5.0]], dtype=DTYPE)
TRILS = torch.tensor([[[1.0, 0.0], [0.6, 0.5]], [[0.5, 0.0], [0.0, 1.2]], [[0.8, 0.0], [-0.4, 0.4]]], dtype=DTYPE)


def _three_clusters(n: int = 3000) -> torch.Tensor:
    component = torch.multinomial(WEIGHTS, n, replacement=True)
    return MEANS[component] + (TRILS[component] @ torch.randn(n, 2, 1, dtype=DTYPE)).squeeze(-1)


def test_fitted_mixture_recovers_a_well_separated_mixture_as_scikit_learn_does():
    from sklearn.mixture import GaussianMixture

    codes = _three_clusters()
    mixture = FittedMixture(2).fit(codes, 3)
    order = torch.cdist(MEANS, mixture.means).argmin(1)  # the fitted component nearest each true mean
    torch.testing.assert_close(mixture.means[order], MEANS, atol=0.15, rtol=0)
    torch.testing.assert_close(mixture.weights[order], WEIGHTS, atol=0.03, rtol=0)
    cov = mixture.scale_tril @ mixture.scale_tril.mT
    torch.testing.assert_close(cov[order], TRILS @ TRILS.mT, atol=0.15, rtol=0)
    z = torch.randn(4, 5, 2, dtype=DTYPE)
    torch.testing.assert_close(mixture.log_prob(z), mixture.distribution().log_prob(z), rtol=1e-12, atol=1e-12)
    reference = GaussianMixture(3, covariance_type="full", random_state=0).fit(codes.numpy())
    assert mixture.log_prob(codes).mean().item() == pytest.approx(reference.score(codes.numpy()), abs=1e-4)
    torch.testing.assert_close(
        mixture.log_prob(codes[:50]), torch.from_numpy(reference.score_samples(codes[:50].numpy())), atol=1e-3, rtol=0
    )


def test_fitted_mixture_reaches_scikit_learns_likelihood_on_overlapping_clusters():
    # overlapping, so that the hard k-means++ assignment is far from the fit and only EM's iterations get there
    from sklearn.mixture import GaussianMixture

    component = torch.multinomial(torch.tensor([0.6, 0.4], dtype=DTYPE), 2000, replacement=True)
    means = torch.tensor([[0.0, 0.0], [2.0, 1.0]], dtype=DTYPE)
    codes = means[component] + torch.randn(2000, 2, dtype=DTYPE) * torch.tensor([1.0, 0.7], dtype=DTYPE)
    mixture = FittedMixture(2).fit(codes, 2)
    reference = GaussianMixture(2, random_state=0, tol=1e-8, max_iter=1000).fit(codes.numpy())
    assert mixture.log_prob(codes).mean().item() == pytest.approx(reference.score(codes.numpy()), abs=2e-4)


def test_fitted_mixture_samples_match_the_codes_moments():
    codes = _three_clusters()
    mixture = FittedMixture(2).fit(codes, 3)
    draws = mixture.sample(40_000, generator=torch.Generator().manual_seed(1))
    assert draws.shape == (40_000, 2) and draws.dtype == DTYPE
    torch.testing.assert_close(draws.mean(0), codes.mean(0), atol=0.1, rtol=0)
    torch.testing.assert_close(draws.T.cov(), codes.T.cov(), atol=0.4, rtol=0.03)
    # one correlated Gaussian: the samples' covariance is L L^T, the codes' covariance
    single = FittedMixture(2).fit(codes[:500] @ TRILS[2].mT, 1)
    draws = single.sample(100_000, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(draws.T.cov(), (codes[:500] @ TRILS[2].mT).T.cov(), atol=0, rtol=0.02)  # 4 s.e.
    at_zero = mixture.sample(5, generator=torch.Generator().manual_seed(1), temperature=0.0)
    assert all(any(torch.equal(row, mean) for mean in mixture.means) for row in at_zero)


def test_fitted_mixture_diagonal_covariances():
    mixture = FittedMixture(2).fit(_three_clusters(), 3, covariance="diag")
    assert torch.equal(mixture.scale_tril, torch.diag_embed(mixture.scale_tril.diagonal(dim1=1, dim2=2)))


def test_fitted_mixture_survives_components_without_codes():
    # two distinct codes, repeated: the third component's k-means++ start duplicates one of them and gets no codes
    codes = torch.tensor([[0.0, 0.0], [5.0, 5.0]], dtype=DTYPE).repeat(20, 1)
    mixture = FittedMixture(2).fit(codes, 3)
    assert mixture.num_components == 3 and mixture.weights.min() > 0  # re-seeded, not left dead
    for buffer in (mixture.weights, mixture.means, mixture.scale_tril):
        assert buffer.isfinite().all()
    assert mixture.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert mixture.log_prob(codes).isfinite().all() and mixture.sample(10).isfinite().all()
    # all codes the same: every covariance is jitter only, yet factorised
    assert FittedMixture(2).fit(torch.ones(5, 2, dtype=DTYPE), 2).sample(3).isfinite().all()


def test_fitted_mixture_refuses_bad_fits_and_use_before_fit():
    mixture = FittedMixture(2)
    with pytest.raises(ValueError, match="fitting 5 components needs at least as many codes, got 4"):
        mixture.fit(torch.randn(4, 2), 5)
    with pytest.raises(ValueError, match=r"latent_dim=2\), got \(4, 3\)"):
        mixture.fit(torch.randn(4, 3), 2)
    with pytest.raises(ValueError, match="finite codes"):
        mixture.fit(torch.tensor([[0.0, math.nan], [1.0, 1.0]]), 1)
    assert not mixture.fitted
    with pytest.raises(RuntimeError, match=r"call fit\(codes, num_components\) first"):
        mixture.sample(3)


def test_fitted_mixture_round_trips_through_a_state_dict():
    assert FittedMixture(2).fit(_three_clusters(500).float(), 3).means.dtype == torch.float32  # the codes' dtype
    assert FittedMixture(2).fit(_three_clusters(500).bfloat16(), 3).sample(2).dtype == torch.float32
    mixture = FittedMixture(2).fit(_three_clusters(500), 3)
    fresh = FittedMixture(2)  # float32 and empty: takes the loaded shapes and dtype
    fresh.load_state_dict(mixture.state_dict())
    assert fresh.fitted and fresh.num_components == 3 and fresh.means.dtype == DTYPE
    for a, b in zip(mixture.buffers(), fresh.buffers(), strict=True):
        assert torch.equal(a, b)
    samples = [m.sample(20, generator=torch.Generator().manual_seed(3)) for m in (mixture, fresh)]
    assert torch.equal(*samples)
    parent, fresh_parent = nn.Module(), nn.Module()  # inside a model (a checkpoint's prefixed keys)
    parent.sampler, fresh_parent.sampler = mixture, FittedMixture(2)
    fresh_parent.load_state_dict(parent.state_dict())
    assert torch.equal(fresh_parent.sampler.scale_tril, mixture.scale_tril)
    with pytest.raises(RuntimeError, match="size mismatch for means"):
        FittedMixture(3).load_state_dict(mixture.state_dict())
