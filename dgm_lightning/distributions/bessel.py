"""Modified Bessel functions of the first kind in log space, for the von Mises-Fisher normaliser (DLMF 10.25, 10.41)."""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import torch
from torch import Tensor

_DEBYE_FROM = 30.0  # log I_v(k) by the Debye expansion where sqrt(v^2 + k^2) >= 30, by the power series below
_SERIES_TERMS = 96  # enough terms of the power series for every k < 30 (its terms peak near m = k / 2)
_DEBYE_TERMS = 10


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
