"""What an attention builder is: its kwargs schema, the slot it fills, and the two ways it makes a module.

A builder (one per attention-type name) can
- ``convert(original, slot, context, **kwargs)``: make its module from a pretrained attention module,
  carrying or factorising the weights;
- ``build(slot, **kwargs)``: make the same module with uninitialised weights, from the kwargs a checkpoint
  recorded, so the loader can rebuild the architecture before ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .errors import KwargError

_MISSING = object()


@dataclass(frozen=True)
class Kwarg:
    """One builder kwarg: its type, default, meaning and (optionally) allowed values or a check."""

    name: str
    type: type
    default: Any = _MISSING
    help: str = ""
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error message, or None when valid
    build: bool = True  # False: only used by convert() (calibration settings); still recorded in provenance

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def describe_default(self) -> str:
        return "(required)" if self.required else repr(self.default)

    def coerce(self, value: Any, where: str) -> Any:
        """Return ``value`` as this kwarg's type, or raise :class:`KwargError` naming the kwarg."""
        if self.type is bool and isinstance(value, str):
            low = value.lower()
            if low in ("true", "1", "yes"):
                value = True
            elif low in ("false", "0", "no"):
                value = False
        elif self.type is int and isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        elif self.type is float and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, self.type) and not (self.type is int and isinstance(value, bool))
        if not ok:
            raise KwargError(
                f"{where}: kwarg '{self.name}' must be {self.type.__name__}, got {value!r}"
                + (f" (allowed: {', '.join(map(str, self.choices))})" if self.choices else "")
            )
        if self.choices is not None and value not in self.choices:
            raise KwargError(
                f"{where}: kwarg '{self.name}' is {value!r}; allowed values: {', '.join(map(str, self.choices))}"
            )
        return value


@dataclass(frozen=True)
class Slot:
    """One attention module of a host model, as the family adapter describes it."""

    path: str  # dotted module path inside the model, e.g. "model.decoder.layers.0.encoder_attn"
    kind: str  # "encoder.self" | "decoder.self" | "decoder.cross"
    layer: int  # layer number within its stack
    embed_dim: int
    num_heads: int
    is_causal: bool
    is_cross: bool
    bias: bool
    dropout: float
    layer_idx: int | None  # the cache index the host model uses for this module (None: no cache)
    config: Any = field(repr=False, compare=False, default=None)  # the host model's config

    @property
    def name(self) -> str:
        """Short user-facing name: ``decoder.cross.3``."""
        return f"{self.kind}.{self.layer}"


class ConversionContext(Protocol):
    """What a builder may ask of the conversion while it converts (given by :mod:`mla_registry.surgery`)."""

    def calibration_inputs(self, slot: Slot, data: str, size: int) -> torch.Tensor:
        """The real inputs of ``slot``'s key/value projections over calibration audio: ``[tokens, embed_dim]``.

        For self-attention these are the hidden states entering the module; for cross-attention the encoder
        output. Computed once per (data, size) with the original, unconverted model, and cached.
        """


class AttentionBuilder:
    """Base class of attention builders. Subclasses set ``name``, ``version``, ``kwargs`` and implement
    :meth:`build` and :meth:`convert`; the modules they return implement ``kv_cache_bytes_per_token()``."""

    name: str = ""
    version: str = "0"
    description: str = ""
    kwargs: tuple[Kwarg, ...] = ()
    package: str = ""  # filled by the registry: the distribution that provides the builder

    def validate(self, kwargs: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """Check ``kwargs`` against the schema, fill defaults, and return them; raise :class:`KwargError`."""
        where = where or f"attention '{self.name}'"
        known = {k.name: k for k in self.kwargs}
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            allowed = ", ".join(known) or "none"
            raise KwargError(f"{where}: unknown kwarg(s) {', '.join(unknown)}; '{self.name}' takes: {allowed}")
        out: dict[str, Any] = {}
        for k in self.kwargs:
            if k.name in kwargs:
                value = k.coerce(kwargs[k.name], where)
            elif k.required:
                raise KwargError(f"{where}: kwarg '{k.name}' is required ({k.help})")
            else:
                value = k.default
            if k.check is not None and value is not None:
                problem = k.check(value)
                if problem:
                    raise KwargError(f"{where}: kwarg '{k.name}'={value!r}: {problem}")
            out[k.name] = value
        return out

    def check_slot(self, slot: Slot, kwargs: Mapping[str, Any]) -> None:
        """Raise :class:`KwargError` when ``kwargs`` cannot apply to ``slot`` (e.g. heads not divisible)."""

    def build_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The subset of validated kwargs that shapes the module (what ``build`` needs)."""
        keep = {k.name for k in self.kwargs if k.build}
        return {k: v for k, v in kwargs.items() if k in keep}

    def build(self, slot: Slot, **kwargs: Any) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def convert(self, original: nn.Module, slot: Slot, context: ConversionContext, **kwargs: Any) -> nn.Module:
        raise NotImplementedError  # pragma: no cover - abstract
