"""Select attention slots and swap in the modules that builders make.

An attention spec reads ``SELECTOR=PLUGIN[:KEY=VALUE,...]``, for example ``decoder.*=mla:rank=192,init=svd``.
SELECTOR is one or more slot patterns joined by ``+``; a pattern is a slot kind or glob (``encoder.self``,
``decoder.cross``, ``decoder.*``, ``*``), optionally narrowed to layers: ``decoder.self.0``,
``decoder.cross[0,2-3]``. Later specs override earlier ones on the slots they share.

What was converted is recorded in the model's :mod:`lineage <mla_registry.lineage>` (one :class:`SlotRecord`
per converted slot), which :mod:`mla_registry.checkpoint` writes to the manifest. This module owns the
validation of kwargs (once per spec, then against each slot), and the device, dtype and train mode of every
module it swaps in: plugins only make modules.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from torch import nn

from . import lineage, whisper
from .builder import AttentionBuilder, ConversionContext, Slot, checked_kwargs
from .errors import KwargError, SlotError
from .lineage import SlotRecord
from .registry import get_builder

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
    spec: AttentionSpec | None = None


def plan(model: nn.Module, specs: Iterable[AttentionSpec]) -> list[PlannedSlot]:
    """Resolve specs to (slot, builder, validated kwargs), checking everything before any weight is touched
    (works on a model built on the meta device: the experiments file is checked this way)."""
    by_path: dict[str, PlannedSlot] = {}
    all_slots = whisper.slots(model)
    for spec in specs:
        builder = get_builder(spec.plugin)
        chosen = select(all_slots, spec.selector)
        kwargs = checked_kwargs(builder, spec.kwargs, chosen, where=f"attention spec '{spec.short()}'")
        for slot in chosen:
            by_path[slot.path] = PlannedSlot(slot, builder, kwargs, spec)
    return [by_path[s.path] for s in all_slots if s.path in by_path]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``path`` inside ``model``."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def record(p: PlannedSlot) -> SlotRecord:
    """The manifest record of one converted slot: enough to rebuild it with no user code."""
    build = p.builder.build_kwargs(p.kwargs)
    return SlotRecord(slot=p.slot.name, path=p.slot.path, plugin=p.builder.name, plugin_version=p.builder.version,
                      package=p.builder.package, kwargs=build,
                      convert_kwargs={k: v for k, v in p.kwargs.items() if k not in build})


def _per_slot(planned: list[PlannedSlot], context: ConversionContext | None) -> list[PlannedSlot]:
    """Let each spec's builder decide its slots' kwargs jointly (:meth:`AttentionBuilder.plan`), then check
    what it decided, slot by slot."""
    out: list[PlannedSlot] = []
    groups: dict[int, list[PlannedSlot]] = {}
    for p in planned:
        groups.setdefault(id(p.spec), []).append(p)
    decided: dict[str, dict[str, Any]] = {}
    for group in groups.values():
        first = group[0]
        decided.update(first.builder.plan([p.slot for p in group], first.kwargs, context))
    for p in planned:
        where = f"attention spec '{p.spec.short() if p.spec else p.builder.name}' at slot {p.slot.name}"
        kwargs = checked_kwargs(p.builder, decided[p.slot.path], [p.slot], where=where)
        out.append(PlannedSlot(p.slot, p.builder, kwargs, p.spec))
    return out


def replace_slots(model: nn.Module, specs: Iterable[AttentionSpec], context: ConversionContext | None
                  ) -> list[SlotRecord]:
    """Convert the selected slots of ``model`` in place and return their records (also in the model's lineage).

    Every new module is made from the *original* model (calibration sees unconverted activations) before any is
    swapped in; each goes onto the original module's device and dtype, in its train mode.
    """
    planned = _per_slot(plan(model, specs), context)
    new_modules = []
    for p in planned:
        original = model.get_submodule(p.slot.path)
        module = p.builder.convert(original, p.slot, context, **p.kwargs)
        ref = next(original.parameters())
        new_modules.append(module.to(device=ref.device, dtype=ref.dtype).train(original.training))
    lin = lineage.of(model)
    records = lin.by_path()
    for p, module in zip(planned, new_modules):
        replace_module(model, p.slot.path, module)
        records[p.slot.path] = record(p)
    lin.slots = [records[s.path] for s in whisper.slots(model) if s.path in records]
    return lin.slots


def rebuild(model: nn.Module, records: list[SlotRecord], where: str) -> None:
    """Swap in empty modules rebuilt from manifest ``records`` (the loader's half of :func:`replace_slots`):
    each record's kwargs are validated and checked against its slot, as at conversion."""
    slots = {s.path: s for s in whisper.slots(model)}
    warned: set[str] = set()
    for i, rec in enumerate(records):
        at = f"{where}: slots[{i}] ({rec.slot})"
        slot = slots.get(rec.path)
        if slot is None:
            raise SlotError(f"{at}: the model has no attention slot at path {rec.path!r}")
        builder = get_builder(rec.plugin, package_hint=rec.package or None)
        if rec.plugin not in warned and _newer(rec.plugin_version, builder.version):
            warned.add(rec.plugin)
            warnings.warn(f"{at}: written by plugin '{rec.plugin}' version {rec.plugin_version}, newer than the "
                          f"installed {builder.version} ({builder.package}); the module it rebuilds may differ "
                          "from the one saved: upgrade the plugin's package", PluginVersionWarning, stacklevel=3)
        kwargs = checked_kwargs(builder, rec.kwargs, [slot], where=at)
        module = builder.build(slot, **builder.build_kwargs(kwargs))
        ref = next(model.get_submodule(slot.path).parameters())
        replace_module(model, slot.path, module.to(dtype=ref.dtype))
    lineage.of(model).slots = list(records)


class PluginVersionWarning(UserWarning):
    """A checkpoint was written by a newer version of a plugin than the one installed."""


def _newer(recorded: str, installed: str) -> bool:
    """Whether plugin version ``recorded`` is newer than ``installed``, both dotted numbers (``2``, ``1.4.0``);
    other forms are not compared (the kwargs checks still guard the rebuild)."""
    pattern = re.compile(r"\d{1,9}(?:\.\d{1,9}){0,5}")
    if not (pattern.fullmatch(recorded or "") and pattern.fullmatch(installed or "")):
        return False
    return tuple(map(int, recorded.split("."))) > tuple(map(int, installed.split(".")))


# --- labels ---------------------------------------------------------------------------------------------------

def describe(model: nn.Module) -> dict[str, str]:
    """Per slot kind, a short label of its attention: ``{'decoder.self': 'mla(rank=192)', 'encoder.self':
    'stock', ...}``; slots of one kind that differ in a numeric kwarg read ``mla(rank=64..160)``."""
    recs = lineage.of(model).by_path()
    per_kind: dict[str, list[SlotRecord | None]] = {}
    for s in whisper.slots(model):
        per_kind.setdefault(s.kind, []).append(recs.get(s.path))
    return {kind: _kind_label(rs) for kind, rs in per_kind.items()}


def _kind_label(records: list[SlotRecord | None]) -> str:
    by_plugin: dict[str, list[SlotRecord]] = {}
    labels = set()
    for r in records:
        if r is None:
            labels.add("stock")
        else:
            by_plugin.setdefault(r.plugin, []).append(r)
    for plugin, rs in by_plugin.items():
        budgets = {r.convert_kwargs.get("budget") for r in rs}
        if len(budgets) == 1 and None not in budgets and all("rank" in r.kwargs for r in rs):
            ranks = sorted(r.kwargs["rank"] for r in rs)
            span = f"{ranks[0]}..{ranks[-1]}" if ranks[0] != ranks[-1] else str(ranks[0])
            others = "".join(f", {part}" for part in _kwarg_parts(plugin, [
                {k: v for k, v in r.kwargs.items() if k != "rank"} for r in rs]))
            labels.add(f"{plugin}(budget {Fraction(budgets.pop()).limit_denominator(1024)}: {span}{others})")
        else:
            labels.add(short_form(plugin, [r.kwargs for r in rs]))
    return "/".join(sorted(labels))


def short_form(plugin: str, kwargs_per_slot: list[dict[str, Any]]) -> str:
    """``mla(rank=192)``: the plugin and the kwargs that differ from their defaults; a kwarg whose value differs
    between slots shows its range (``rank=64..160``) or its values."""
    parts = _kwarg_parts(plugin, kwargs_per_slot)
    return plugin + (f"({','.join(parts)})" if parts else "")


def _kwarg_parts(plugin: str, kwargs_per_slot: list[dict[str, Any]]) -> list[str]:
    """``key=value`` (or ``key=lo..hi``, ``key=a|b``) for each kwarg that differs from its default."""
    try:
        defaults = {k.name: k.default for k in get_builder(plugin).kwargs if not k.required}
    except Exception:  # noqa: BLE001 - a label must not fail; show every kwarg instead
        defaults = {}
    keys = [k for k in dict.fromkeys(k for kw in kwargs_per_slot for k in kw)]
    parts = []
    for k in keys:
        values = [kw.get(k) for kw in kwargs_per_slot]
        distinct = list(dict.fromkeys(values))
        if len(distinct) == 1:
            if defaults.get(k, object()) != distinct[0]:
                parts.append(f"{k}={distinct[0]}")
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in distinct):
            parts.append(f"{k}={min(distinct)}..{max(distinct)}")
        else:
            parts.append(f"{k}={'|'.join(map(str, distinct))}")
    return parts


def attention_label(attention: dict[str, str] | None) -> str:
    """One line for a table: ``self=mla(rank=192) cross=mla(rank=192)``; the encoder only when it is not stock."""
    if not attention:
        return ""
    parts = []
    for kind, label in attention.items():
        stack, _, role = kind.partition(".")
        if stack == "encoder":
            if label != "stock":
                parts.append(f"enc.{role}={label}")
        else:
            parts.append(f"{role}={label}")
    return " ".join(parts)
