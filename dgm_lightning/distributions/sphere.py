"""The unit sphere S^{d-1} in R^d: its constraint and area, the base of the distributions symmetric about a mean
direction (their rotation of samples into place), and the uniform distribution on it."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.nn import functional as F

NO_SAMPLE_SHAPE = torch.Size()  # one sample per batch element


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


def check_sphere_dim(dim: int, what: str) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"{what} must be an integer >= 2 (the ambient dimension d; d = 2 is the circle), got {dim!r}")


class SphericalDistribution(Distribution):
    """A distribution on S^{d-1} symmetric about a mean direction ``loc`` with a concentration ``scale``."""

    arg_constraints = {"loc": unit_sphere, "scale": constraints.nonnegative}
    support = unit_sphere
    has_rsample = True

    def __init__(self, loc: Tensor, scale: Tensor | float, *, validate_args: bool | None = None) -> None:
        if loc.dim() < 1:
            raise ValueError(f"loc must have shape (..., d), the mean direction in R^d; got shape {tuple(loc.shape)}")
        check_sphere_dim(loc.shape[-1], "loc's last dim")
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

    def expand(self, batch_shape: torch.Size, _instance: Distribution | None = None) -> SphericalDistribution:
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.scale = self.scale.expand(batch_shape)
        Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape: torch.Size = NO_SAMPLE_SHAPE) -> Tensor:
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
        check_sphere_dim(dim, "dim")
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

    def rsample(self, sample_shape: torch.Size = NO_SAMPLE_SHAPE) -> Tensor:
        gaussian = torch.randn(self._extended_shape(sample_shape), dtype=self._dtype, device=self._device)
        return F.normalize(gaussian, dim=-1)

    def sample(self, sample_shape: torch.Size = NO_SAMPLE_SHAPE) -> Tensor:
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
