"""mla_registry.builder: the kwargs schema (coercion, choices, checks, required), validated once."""

from __future__ import annotations

import pytest

from mla_registry.builder import AttentionBuilder, Kwarg, checked_kwargs
from mla_registry.errors import KwargError


class Toy(AttentionBuilder):
    name = "toy"
    kwargs = (Kwarg("width", int, help="how wide", check=lambda v: None if v > 0 else "must be > 0"),
              Kwarg("mode", str, "a", "which", choices=("a", "b")),
              Kwarg("fast", bool, False, "on or off"),
              Kwarg("rate", float, 0.5, "a number", build=False))


def test_coercion_defaults_and_build_kwargs():
    out = Toy().validate({"width": "3", "fast": "yes", "rate": "2"})
    assert out == {"width": 3, "mode": "a", "fast": True, "rate": 2.0}
    assert Toy().build_kwargs(out) == {"width": 3, "mode": "a", "fast": True}


@pytest.mark.parametrize("kwargs,message", [
    ({}, "kwarg 'width' is required"), ({"width": 0}, "'width'=0: must be > 0"),
    ({"width": "x"}, "'width' must be int, got 'x'"), ({"width": True}, "must be int"),
    ({"width": 1, "mode": "c"}, "allowed values: a, b"), ({"width": 1, "colour": 1}, "unknown kwarg"),
])
def test_errors_name_the_kwarg(kwargs, message):
    with pytest.raises(KwargError, match=message):
        Toy().validate(kwargs)


def test_a_check_that_raises_becomes_a_kwarg_error_naming_the_plugin():
    class Broken(Toy):
        kwargs = (Kwarg("width", int, 1, "w", check=lambda v: v.nope),)

    with pytest.raises(KwargError, match="plugin 'toy'.*AttributeError"):
        checked_kwargs(Broken(), {"width": 2}, [], where="spec")
