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

from dgm_lightning.distributions import kl  # noqa: F401  (registers the KLs with torch.distributions)
from dgm_lightning.distributions.bessel import log_bessel_iv_scaled, mean_resultant_length
from dgm_lightning.distributions.power_spherical import PowerSpherical
from dgm_lightning.distributions.sphere import (
    HypersphericalUniform,
    SphericalDistribution,
    log_sphere_area,
    unit_sphere,
)
from dgm_lightning.distributions.von_mises_fisher import VonMisesFisher

__all__ = [
    "HypersphericalUniform",
    "PowerSpherical",
    "SphericalDistribution",
    "VonMisesFisher",
    "log_bessel_iv_scaled",
    "log_sphere_area",
    "mean_resultant_length",
    "unit_sphere",
]
