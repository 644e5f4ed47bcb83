"""One definition per configuration: a dataclass whose fields carry their help, allowed values and checks.

From that one definition come the YAML validation (:func:`problems`, :func:`from_mapping`, with every error
naming its key), the click options of the commands that take the same settings (:func:`click_options`), and
the serialised form recorded in results (``dataclasses.asdict``). As peft's dataclass configs are its
``adapter_config.json``, these dataclasses are what ``experiments.yaml`` sections and ``metrics.json`` hold.

    @dataclass(frozen=True)
    class DecodeSettings:
        batch_size: int = setting(16, "utterances decoded together", check=at_least(1))
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import click

from .errors import KwargError

Check = Callable[[Any], str | None]


def setting(default: Any = dataclasses.MISSING, help: str = "", *, check: Check | None = None,
            choices: tuple | None = None, flags: tuple[str, ...] | None = None, cli: bool = True) -> Any:
    """A dataclass field with its documentation and validation. ``check(value)`` returns a message or None;
    ``flags`` overrides the click flag names (default ``--field-name``); ``cli=False`` keeps it out of the
    command line (YAML only)."""
    meta = {"help": help, "check": check, "choices": choices, "flags": flags, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}"


def between(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allowed_types(hint: Any) -> tuple[type, ...]:
    """The runtime types a type hint admits (``int | None`` -> (int, NoneType); ``list[str]`` -> (list,))."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _allowed_types(arg))
    if origin is not None:
        return (origin,)
    return (type(None),) if hint is None or hint is type(None) else (hint,)


def _type_words(types_: tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types_)


def _coerce(value: Any, types_: tuple[type, ...]) -> Any:
    """YAML reads ``3e-4`` as a string and ``1`` as an int where a float is due: accept those."""
    if float in types_ and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _fits(value: Any, types_: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types_
    if isinstance(value, list) and list in types_:
        return all(isinstance(v, str) for v in value)  # the only list settings are lists of references
    return isinstance(value, types_)


def fields(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def problems(cls: type, mapping: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, message)`` for every unknown key, wrong type, disallowed value or failed check in ``mapping``
    (a section of YAML); an empty list when it is a valid partial ``cls``."""
    known = {f.name: f for f in fields(cls)}
    out: list[tuple[str, str]] = []
    for key, value in mapping.items():
        f = known.get(key)
        if f is None:
            out.append((str(key), f"unknown key '{key}'; allowed: {', '.join(known)}"))
            continue
        types_ = _allowed_types(_hints(cls)[key])
        value = _coerce(value, types_)
        if not _fits(value, types_):
            out.append((key, f"must be {_type_words(types_)}, got {type(value).__name__} {value!r:.60}"))
            continue
        if value is None:
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            out.append((key, f"{value!r} is not allowed; allowed values: {', '.join(map(str, choices))}"))
            continue
        check = f.metadata.get("check")
        message = check(value) if check else None
        if message:
            out.append((key, f"{value!r}: {message}"))
    return out


def from_mapping(cls: type, mapping: Mapping[str, Any] | None, where: str = "") -> Any:
    """An instance of ``cls`` from ``mapping`` (missing keys take their defaults); a :class:`KwargError`
    listing every problem, each naming its key."""
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, Mapping):
        raise KwargError(f"{where or cls.__name__} must be a mapping of {', '.join(f.name for f in fields(cls))}, "
                         f"got {type(mapping).__name__}")
    found = problems(cls, mapping)
    missing = [f.name for f in fields(cls) if f.name not in mapping and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    found += [(m, f"'{m}' is required: {fields_by_name(cls)[m].metadata.get('help', '')}") for m in missing]
    if found:
        prefix = f"{where}." if where else ""
        raise KwargError("; ".join(f"{prefix}{k}: {msg}" for k, msg in found))
    hints = _hints(cls)
    return cls(**{k: _coerce(v, _allowed_types(hints[k])) for k, v in mapping.items()})


def fields_by_name(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls)}


def check(instance: Any) -> None:
    """Validate a constructed instance (``__post_init__`` of the configs calls this)."""
    found = problems(type(instance), dataclasses.asdict(instance))
    if found:
        raise KwargError("; ".join(f"{k}: {msg}" for k, msg in found))


def click_options(cls: type, exclude: tuple[str, ...] = ()) -> Callable:
    """A decorator adding one click option per field of ``cls`` (``--field-name``, its type, default, help and
    choices), except ``exclude`` and fields marked ``cli=False``. The command receives them under the field
    names; :func:`from_cli` turns them into an instance."""

    def decorate(fn: Callable) -> Callable:
        for f in reversed(fields(cls)):
            if f.name in exclude or not f.metadata.get("cli", True):
                continue
            types_ = _allowed_types(_hints(cls)[f.name])
            base = next((t for t in types_ if t is not type(None)), str)
            flags = f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",)
            default = None if f.default is dataclasses.MISSING else f.default
            choices = f.metadata.get("choices")
            kind = click.Choice([str(c) for c in choices]) if choices else {int: int, float: float}.get(base, str)
            if base is bool:
                fn = click.option(f"{flags[0]}/--no-{flags[0][2:]}", f.name, default=default, show_default=True,
                                  help=f.metadata.get("help", ""))(fn)
            else:
                fn = click.option(*flags, f.name, type=kind, default=default, show_default=default is not None,
                                  help=f.metadata.get("help", ""))(fn)
        return fn

    return decorate


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of field ``f`` (what :func:`click_options` names it)."""
    return (f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",))[0]


def from_cli(cls: type, values: Mapping[str, Any], **extra: Any) -> Any:
    """An instance of ``cls`` from the options :func:`click_options` added (plus ``extra`` fields); a problem
    names the option as it was typed (``--batch-size``), not the field."""
    by_name = fields_by_name(cls)
    mapping = {k: v for k, v in values.items() if k in by_name}
    found = [(flag_of(by_name[k]), msg) for k, msg in problems(cls, mapping)]
    if found:
        raise KwargError("; ".join(f"{flag}: {msg}" for flag, msg in found))
    return from_mapping(cls, {**mapping, **extra})
