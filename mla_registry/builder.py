"""What an attention builder is: its kwargs schema, the slot it fills, and the two ways it makes a module.

A builder (one per attention-type name) can
- ``convert(original, slot, context, **kwargs)``: make its module from a pretrained attention module,
  carrying or factorising the weights;
- ``build(slot, **kwargs)``: make the same module with uninitialised weights, from the kwargs a checkpoint
  recorded, so the loader can rebuild the architecture before ``load_state_dict(strict=True)``;
- optionally ``to_stock(module, slot)``: the module's weights as stock attention (export to plain
  transformers and CTranslate2); the default refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .errors import ExportError, KwargError

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
        if value is None and self.default is None:  # an optional kwarg left unset (as validate() fills it)
            return None
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
    """What a builder may ask of the conversion while it converts (given by :mod:`mla_registry.convert`).

    Calibration is a setting of the conversion (``--calibration REF --calibration-size N``, the YAML's
    ``data.calibration`` / ``data.calibration_size``), not a kwarg of any plugin: every plugin that asks gets the
    same utterances, and the checkpoint records which. The tensors it returns are shared (between the cross
    slots of a model, and with later conversions of the same weights in one run): read them, never write into
    them."""

    def calibration_inputs(self, slot: Slot) -> torch.Tensor:
        """The real inputs of ``slot``'s key/value projections over the calibration audio: ``[tokens, embed_dim]``.

        For self-attention these are the hidden states entering the module; for cross-attention the encoder
        output. Computed once, with the original unconverted model, and cached."""

    def query_inputs(self, slot: Slot) -> torch.Tensor:
        """The real inputs of ``slot``'s query projection over the calibration audio: ``[tokens, embed_dim]``
        (the same tensor as :meth:`calibration_inputs` for self-attention; the decoder's hidden states for
        cross-attention)."""

    def original(self, slot: Slot) -> nn.Module:
        """The pretrained (not yet converted) module at ``slot``, for decisions a builder takes in
        :meth:`AttentionBuilder.plan` (e.g. ranks under a KV budget)."""


@dataclass(frozen=True)
class Equivalence:
    """Two configurations a plugin declares equal in output (the conformance kit checks each):
    ``kwargs`` (merged into a case's kwargs) against ``reference`` (other kwargs; ``None``: the original,
    unconverted model)."""

    what: str
    kwargs: Mapping[str, Any]
    reference: Mapping[str, Any] | None = None
    atol: float = 1e-4


class AttentionBuilder:
    """Base class of attention builders. Subclasses set ``name``, ``version``, ``kwargs`` (the schema),
    ``parameter_groups``, and implement :meth:`build` and :meth:`convert`; the modules they return implement
    ``kv_cache_bytes_per_token()``.

    Kwargs arrive validated: the caller (:mod:`mla_registry.surgery` when converting, the loader when
    rebuilding) runs :meth:`validate` and :meth:`check_slot` once; ``build`` and ``convert`` do not repeat it.
    The module ``convert`` returns may be on any device and dtype and in any train mode: surgery puts it on the
    original's device, dtype and mode."""

    name: str = ""
    version: str = "0"
    description: str = ""
    kwargs: tuple[Kwarg, ...] = ()
    #: parameter-name prefixes (inside the module) of each group: "query", "kv" (what makes or holds K/V),
    #: "output". Fine-tuning's ``trainable: kv`` trains the "kv" group; a plugin that declares none cannot be
    #: fine-tuned that way (a clear error, never "train everything").
    parameter_groups: Mapping[str, tuple[str, ...]] = {}
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

    def plan(self, slots: list[Slot], kwargs: Mapping[str, Any], context: ConversionContext | None
             ) -> dict[str, dict[str, Any]]:
        """Per-slot kwargs for the slots one spec selected, by slot path. The default gives every slot the same
        kwargs; a builder overrides it to decide across slots (e.g. ranks allocated under one KV budget). What
        it returns is validated and checked per slot, then recorded per slot in the manifest."""
        return {s.path: dict(kwargs) for s in slots}

    def equivalences(self, slot: Slot) -> list[Equivalence]:
        """Configurations that must reproduce each other (or the original) exactly, for the conformance kit."""
        return []

    def build(self, slot: Slot, **kwargs: Any) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def convert(self, original: nn.Module, slot: Slot, context: ConversionContext | None,
                **kwargs: Any) -> nn.Module:
        raise NotImplementedError  # pragma: no cover - abstract

    def to_stock(self, module: nn.Module, slot: Slot) -> dict[str, torch.Tensor]:
        """``module``'s weights as the state dict of the host's stock attention (Whisper: ``q_proj``, ``k_proj``
        (no bias), ``v_proj``, ``out_proj``, each ``embed_dim x embed_dim``), for ``mla-registry export --to
        transformers``/``ctranslate2``. Only exact re-expressions belong here: a plugin whose module is not
        stock attention in other coordinates keeps this default, which refuses."""
        raise ExportError(f"attention '{self.name}' ({self.package or type(self).__module__}) at slot {slot.name}: "
                          "this plugin has no stock-attention form (its builder does not implement to_stock()), so "
                          "the checkpoint cannot be exported as a plain transformers or CTranslate2 model; "
                          "--to onnx keeps the plugin's own modules")


def checked_kwargs(builder: AttentionBuilder, kwargs: Mapping[str, Any], slots: list[Slot], where: str
                   ) -> dict[str, Any]:
    """``kwargs`` validated by ``builder`` and checked against every slot, once. Anything but a
    :class:`KwargError` raised by the plugin's own checks becomes a KwargError naming the plugin (a bug in a
    plugin's validation must read as that, not as a traceback)."""
    try:
        out = builder.validate(kwargs, where=where)
        for slot in slots:
            builder.check_slot(slot, out)
    except KwargError as exc:
        if where and not str(exc).startswith(where):  # a plugin's own message: say where the kwargs came from
            raise KwargError(f"{where}: {exc}") from None
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise KwargError(f"{where}: plugin '{builder.name}' ({builder.package or type(builder).__module__}) "
                         f"failed while checking its kwargs: {type(exc).__name__}: {exc}") from None
    return out
