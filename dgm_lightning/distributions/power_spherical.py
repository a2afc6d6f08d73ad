"""The Power Spherical distribution (De Cao & Aziz 2020, arXiv:2006.04437)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Dirichlet

from dgm_lightning.distributions.sphere import NO_SAMPLE_SHAPE, SphericalDistribution


class PowerSpherical(SphericalDistribution):
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

    def rsample(self, sample_shape: torch.Size = NO_SAMPLE_SHAPE) -> Tensor:
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
