"""The KLs of the hyperspherical distributions, registered with ``torch.distributions.kl.register_kl``."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions.kl import register_kl

from dgm_lightning.distributions.power_spherical import PowerSpherical
from dgm_lightning.distributions.sphere import HypersphericalUniform, SphericalDistribution, log_sphere_area
from dgm_lightning.distributions.von_mises_fisher import VonMisesFisher


def _check_same_sphere(q: SphericalDistribution, p: HypersphericalUniform) -> None:
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
