"""Input checks name the argument and the allowed values."""

import math

import pytest

from d2dpm.errors import ConfigError, check_float_range, check_int_range


@pytest.mark.parametrize("value, expected", [(4, 4), ("8", 8), (" 6 ", 6), (3.0, 3), (16, 16)])
def test_integers_accepted(value, expected):
    assert check_int_range("w_bits", value, 2, 8, extra=(16, 32)) == expected


@pytest.mark.parametrize("value", [1, 9, 2.5, "four", None, True, 12])
def test_integers_refused_with_the_allowed_values(value):
    with pytest.raises(ConfigError) as refused:
        check_int_range("w_bits", value, 2, 8, extra=(16, 32))
    assert str(refused.value) == f"w_bits: got {value!r}; allowed: an integer from 2 to 8, or 16, 32"


@pytest.mark.parametrize("value", [-0.01, 1.01, math.nan, "x", None])
def test_floats_refused(value):
    with pytest.raises(ConfigError, match="eta: got .*; allowed: a number from 0 to 1"):
        check_float_range("eta", value, 0.0, 1.0)
