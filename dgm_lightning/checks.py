"""Checks of settings: each raises a ValueError that names the setting, the value given and what it must be."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, get_args


def choices(literal: Any) -> tuple[str, ...]:
    """The choices of a ``Literal`` type, the one place they are written (``Likelihood = Literal[...]``)."""
    return get_args(literal)


def check_choice(name: str, value: str, literal: Any) -> None:
    """Raise a ValueError naming the valid choices (those of the ``Literal`` type) when ``value`` is not one."""
    options = choices(literal)
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(options)}")


def check_positive(**values: float | None) -> None:
    """Raise a ValueError for each named value that is not a finite number > 0 (None means 'not used' and passes)."""
    for name, value in values.items():
        # written so that NaN fails too: every comparison with NaN is False
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be > 0 and finite, got {value}")


def check_non_negative(**values: float) -> None:
    """Raise a ValueError for each named value that is not a finite number >= 0 (a weight that 0 switches off)."""
    for name, value in values.items():
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be >= 0 and finite, got {value}")


def check_positive_int(**values: int | None) -> None:
    """Raise a ValueError for each named value that is not an integer > 0 (None means 'not used' and passes)."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_temperature(temperature: float) -> None:
    """Refuse a sampling temperature that is not a finite number >= 0 (NaN or Inf would give NaN samples)."""
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0 (0 gives the mode), got {temperature}")


def check_fraction(**values: float) -> None:
    """Raise a ValueError for each named value that is not in [0, 1) (a probability that 1 would make degenerate)."""
    for name, value in values.items():
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_hidden_dims(hidden_dims: Sequence[int], *, layer: str) -> None:
    """Refuse ``hidden_dims`` unless it holds at least one width and every width is an integer > 0; ``layer`` names
    what one width is the width of, for the error ("RNN layer", "hidden layer of a coupling network")."""
    if len(hidden_dims) == 0:
        raise ValueError(f"hidden_dims must hold one width per {layer}, at least one, got none")
    check_positive_int(**{f"hidden_dims[{i}]": width for i, width in enumerate(hidden_dims)})


def check_likelihood_range(likelihood: str, value_range: tuple[float, float]) -> None:
    """Refuse a Bernoulli likelihood (plain or continuous) for data outside (0, 1), the only values it models."""
    if likelihood in ("bernoulli", "continuous_bernoulli") and tuple(value_range) != (0.0, 1.0):
        raise ValueError(
            f"the {likelihood} likelihood models pixels in (0, 1) but value_range is {tuple(value_range)}; "
            "use value_range (0, 1) or a gaussian likelihood"
        )
