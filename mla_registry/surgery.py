"""Select attention slots and swap in the modules that builders make.

An attention spec reads ``SELECTOR=PLUGIN[:KEY=VALUE,...]``, for example ``decoder.*=mla:rank=192,init=svd``.
SELECTOR is one or more slot patterns joined by ``+``; a pattern is a slot kind or glob (``encoder.self``,
``decoder.cross``, ``decoder.*``, ``*``), optionally narrowed to layers: ``decoder.self.0``,
``decoder.cross[0,2-3]``. Later specs override earlier ones on the slots they share.

The model remembers what was converted in ``model.mla_registry_slots`` (one record per converted slot), which
:mod:`mla_registry.checkpoint` writes to the manifest.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .builder import AttentionBuilder, ConversionContext, Slot
from .errors import KwargError, SlotError
from .families import whisper
from .registry import get_builder

SLOTS_ATTR = "mla_registry_slots"
_LAYERS = re.compile(r"^(?P<kind>[\w.*?]+?)(?:\.(?P<one>\d+)|\[(?P<list>[\d,\s-]+)\])?$")


@dataclass
class AttentionSpec:
    """Which slots get which plugin with which kwargs."""

    selector: str
    plugin: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def short(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.selector}={self.plugin}" + (f":{args}" if args else "")


def parse_spec(text: str) -> AttentionSpec:
    """Parse ``SELECTOR=PLUGIN[:k=v,...]``; values stay strings until the builder's schema coerces them."""
    selector, sep, rest = text.partition("=")
    if not sep or not selector.strip() or not rest.strip():
        raise KwargError(f"attention spec {text!r} must read SELECTOR=PLUGIN[:key=value,...], "
                         "e.g. 'decoder.*=mla:rank=192'")
    plugin, _, args = rest.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise KwargError(f"attention spec {text!r}: {item!r} must read key=value")
        kwargs[key.strip()] = value.strip()
    return AttentionSpec(selector.strip(), plugin.strip(), kwargs)


def spec_from_mapping(selector: str, value: str | Mapping[str, Any]) -> AttentionSpec:
    """A spec from YAML: ``{selector: "mla:rank=192"}`` or ``{selector: {plugin: mla, rank: 192}}``."""
    if isinstance(value, str):
        return parse_spec(f"{selector}={value}")
    if not isinstance(value, Mapping) or "plugin" not in value:
        raise KwargError(f"attention for '{selector}' must be 'plugin:key=value,...' or a mapping with 'plugin'")
    kwargs = {k: v for k, v in value.items() if k != "plugin"}
    return AttentionSpec(selector, str(value["plugin"]), kwargs)


def _layers(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def select(slots: list[Slot], selector: str) -> list[Slot]:
    """The slots matching ``selector``; a pattern that matches nothing is a :class:`SlotError` listing slots."""
    chosen: list[Slot] = []
    for pattern in selector.split("+"):
        pattern = pattern.strip()
        m = _LAYERS.match(pattern)
        if not m:
            raise SlotError(f"slot selector {pattern!r} is malformed; examples: decoder.cross, decoder.*, "
                            "decoder.self.0, decoder.cross[0,2-3]")
        kind = m["kind"]
        layers = {int(m["one"])} if m["one"] else _layers(m["list"]) if m["list"] else None
        hits = [s for s in slots if fnmatch.fnmatchcase(s.kind, kind) and (layers is None or s.layer in layers)]
        if not hits:
            kinds = sorted({s.kind for s in slots})
            n = {k: sum(s.kind == k for s in slots) for k in kinds}
            avail = ", ".join(f"{k} (layers 0-{n[k] - 1})" for k in kinds)
            raise SlotError(f"slot selector {pattern!r} matches no attention slot; available: {avail}")
        chosen += [s for s in hits if s not in chosen]
    return chosen


@dataclass
class PlannedSlot:
    slot: Slot
    builder: AttentionBuilder
    kwargs: dict[str, Any]  # validated, defaults filled


def plan(model: nn.Module, specs: Iterable[AttentionSpec]) -> list[PlannedSlot]:
    """Resolve specs to (slot, builder, validated kwargs), checking everything before any weight is touched."""
    by_path: dict[str, PlannedSlot] = {}
    all_slots = whisper.slots(model)
    for spec in specs:
        builder = get_builder(spec.plugin)
        kwargs = builder.validate(spec.kwargs, where=f"attention spec '{spec.short()}'")
        for slot in select(all_slots, spec.selector):
            builder.check_slot(slot, kwargs)
            by_path[slot.path] = PlannedSlot(slot, builder, kwargs)
    return [by_path[s.path] for s in all_slots if s.path in by_path]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``path`` inside ``model``."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def record(p: PlannedSlot) -> dict[str, Any]:
    """The manifest record of one converted slot: enough to rebuild it with no user code."""
    return {
        "slot": p.slot.name,
        "path": p.slot.path,
        "plugin": p.builder.name,
        "plugin_version": p.builder.version,
        "package": p.builder.package,
        "kwargs": p.builder.build_kwargs(p.kwargs),
        "convert_kwargs": {k: v for k, v in p.kwargs.items() if k not in p.builder.build_kwargs(p.kwargs)},
    }


def convert(model: nn.Module, specs: Iterable[AttentionSpec], context: ConversionContext) -> list[dict]:
    """Convert the selected slots of ``model`` in place and return their manifest records.

    Every new module is made from the *original* model (calibration sees unconverted activations) before any
    is swapped in.
    """
    planned = plan(model, specs)
    new_modules = []
    for p in planned:
        original = model.get_submodule(p.slot.path)
        module = p.builder.convert(original, p.slot, context, **p.kwargs)
        ref = next(original.parameters())
        new_modules.append(module.to(device=ref.device, dtype=ref.dtype))
    records = _records(model)
    for p, module in zip(planned, new_modules):
        replace_module(model, p.slot.path, module)
        records[p.slot.path] = record(p)
    setattr(model, SLOTS_ATTR, [records[s.path] for s in whisper.slots(model) if s.path in records])
    return getattr(model, SLOTS_ATTR)


def _records(model: nn.Module) -> dict[str, dict]:
    return {r["path"]: r for r in getattr(model, SLOTS_ATTR, [])}


def rebuild(model: nn.Module, records: list[dict], where: str) -> None:
    """Swap in empty modules rebuilt from manifest ``records`` (the loader's half of :func:`convert`)."""
    slots = {s.path: s for s in whisper.slots(model)}
    for i, rec in enumerate(records):
        at = f"{where}: slots[{i}]"
        try:
            slot = slots[rec["path"]]
            builder = get_builder(rec["plugin"], package_hint=(rec.get("package") or "").split(" ")[0] or None)
        except KeyError as exc:
            raise SlotError(f"{at}: the model has no attention slot at {exc}") from None
        kwargs = builder.validate(rec.get("kwargs", {}), where=at)
        replace_module(model, slot.path, builder.build(slot, **builder.build_kwargs(kwargs)))
    setattr(model, SLOTS_ATTR, list(records))


def describe(model: nn.Module) -> dict[str, str]:
    """Short per-kind form of a model's attention, e.g. ``{'decoder.self': 'mla(rank=192)', ...}``."""
    recs = _records(model)
    out: dict[str, set[str]] = {}
    for s in whisper.slots(model):
        out.setdefault(s.kind, set()).add(short_form(recs[s.path]) if s.path in recs else "stock")
    return {k: "/".join(sorted(v)) for k, v in out.items()}


def short_form(rec: dict) -> str:
    """``mla(rank=192)``: the plugin and the kwargs that differ from their defaults."""
    try:
        defaults = {k.name: k.default for k in get_builder(rec["plugin"]).kwargs if not k.required}
    except Exception:  # noqa: BLE001 - a label must not fail; show every kwarg instead
        defaults = {}
    args = ",".join(f"{k}={v}" for k, v in rec.get("kwargs", {}).items() if defaults.get(k, object()) != v)
    return rec["plugin"] + (f"({args})" if args else "")
