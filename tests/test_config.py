"""mla_registry.config: one dataclass gives YAML validation naming every key, and click options."""

from __future__ import annotations

from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from mla_registry import config
from mla_registry.errors import KwargError


@dataclass(frozen=True)
class Example:
    size: int = config.setting(4, "how many", check=config.at_least(1))
    rate: float = config.setting(0.5, "how fast", check=config.between(0, 1))
    mode: str = config.setting("a", "which", choices=("a", "b"))
    refs: str | list[str] = config.setting("x", "one or several")
    limit: int | None = config.setting(None, "optional")
    flag: bool = config.setting(False, "on or off")


def test_problems_name_every_key():
    found = dict(config.problems(Example, {"size": 0, "rate": "fast", "mode": "c", "refs": [1], "limit": True,
                                           "extra": 1}))
    assert found == {"size": "0: must be at least 1", "rate": "must be a number, got str 'fast'",
                     "mode": "'c' is not allowed; allowed values: a, b",
                     "refs": "must be a string or a list, got list [1]",
                     "limit": "must be an integer or null, got bool True",
                     "extra": "unknown key 'extra'; allowed: size, rate, mode, refs, limit, flag"}
    assert config.problems(Example, {"size": 2, "rate": 1, "refs": ["a", "b"], "limit": None}) == []


def test_from_mapping_coerces_yaml_numbers_and_raises_with_the_section():
    assert config.from_mapping(Example, {"rate": "3e-1", "size": 2}) == Example(size=2, rate=0.3)
    with pytest.raises(KwargError, match=r"decoding\.size: 0: must be at least 1"):
        config.from_mapping(Example, {"size": 0}, where="decoding")


def test_click_options_come_from_the_same_definition():
    @click.command()
    @config.click_options(Example, exclude=("refs",))
    def cmd(**values):
        click.echo(repr(config.from_cli(Example, values)))

    ok = CliRunner().invoke(cmd, ["--size", "3", "--mode", "b", "--flag"])
    assert ok.exit_code == 0 and "Example(size=3, rate=0.5, mode='b', refs='x', limit=None, flag=True)" in ok.output
    assert CliRunner().invoke(cmd, ["--mode", "c"]).exit_code == 2  # choices enforced by click
    bad = CliRunner().invoke(cmd, ["--size", "0"])
    assert isinstance(bad.exception, KwargError) and "size: 0: must be at least 1" in str(bad.exception)
    assert "how many" in CliRunner().invoke(cmd, ["--help"]).output
