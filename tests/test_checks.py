"""The settings checks of dgm_lightning.checks."""

from __future__ import annotations

from typing import Literal

import pytest

from dgm_lightning.checks import check_choice, check_fraction, choices

Color = Literal["red", "green"]


def test_choices_come_from_the_literal_type_and_check_choice_names_them():
    assert choices(Color) == ("red", "green")
    check_choice("color", "red", Color)
    with pytest.raises(ValueError, match="unknown color 'Red'; choose one of: red, green"):
        check_choice("color", "Red", Color)


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_check_fraction_refuses_values_outside_zero_to_one(value):
    check_fraction(dropout=0.0, smoothing=0.99)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        check_fraction(dropout=value)
