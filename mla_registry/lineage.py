"""What a model carries about its own history: which slots a plugin converted (with which kwargs) and where it
came from (source model, conversions, fine-tuning). One typed record per model, written to the checkpoint
manifest by :func:`mla_registry.checkpoint.save` and read back by :func:`mla_registry.checkpoint.load`.

The record lives on the model as one attribute (``model.mla_registry``, a :class:`Lineage`); read and change it
only through :func:`of` and the functions here, so every writer (``convert``, ``finetune``, the experiment
runner) produces the same provenance shape.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

ATTR = "mla_registry"


@dataclass
class SlotRecord:
    """One converted slot: enough to rebuild its module with no user code."""

    slot: str  # user-facing name, e.g. "decoder.cross.3"
    path: str  # module path inside the model
    plugin: str
    plugin_version: str
    package: str  # "DIST VERSION" of the distribution that provided the plugin (the writer's claim)
    kwargs: dict[str, Any]  # what build() needs
    convert_kwargs: dict[str, Any] = field(default_factory=dict)  # used by convert() only (provenance)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kind(self) -> str:
        return self.slot.rpartition(".")[0]


@dataclass
class Provenance:
    """Where a model came from. ``conversions`` and ``finetunes`` are in the order they happened."""

    source_model: str | None = None  # the reference the first conversion started from
    conversions: list[dict[str, Any]] = field(default_factory=list)  # {source_model, attention_specs, calibration}
    finetunes: list[dict[str, Any]] = field(default_factory=list)  # each fine-tune's config, curve, data, teacher
    experiment: dict[str, Any] | None = None  # {file, variant, build_fingerprint} when a run built it

    @property
    def finetune(self) -> dict[str, Any] | None:
        """The latest fine-tune, if any."""
        return self.finetunes[-1] if self.finetunes else None

    def to_json(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Provenance:
        data = data or {}
        return cls(source_model=data.get("source_model"), conversions=list(data.get("conversions") or []),
                   finetunes=list(data.get("finetunes") or []), experiment=data.get("experiment"))


@dataclass
class Lineage:
    """The converted slots of a model (in slot order) and its provenance."""

    slots: list[SlotRecord] = field(default_factory=list)
    provenance: Provenance = field(default_factory=Provenance)

    def by_path(self) -> dict[str, SlotRecord]:
        return {r.path: r for r in self.slots}


def of(model: nn.Module) -> Lineage:
    """The model's lineage (an empty one, attached, for a model nothing has touched)."""
    lin = model.__dict__.get(ATTR)
    if not isinstance(lin, Lineage):
        lin = Lineage()
        model.__dict__[ATTR] = lin
    return lin


def attach(model: nn.Module, lineage: Lineage) -> Lineage:
    """Set the model's lineage (the loader does this after rebuilding it)."""
    model.__dict__[ATTR] = lineage
    return lineage


def record_conversion(model: nn.Module, source_model: str | None, specs: list[str],
                      calibration: dict[str, Any] | None) -> None:
    """Append one conversion to the model's provenance (the first one also names the source model)."""
    prov = of(model).provenance
    if prov.source_model is None:
        prov.source_model = source_model
    prov.conversions.append({"source_model": source_model, "attention_specs": list(specs),
                             "calibration": calibration})


def record_finetune(model: nn.Module, result: dict[str, Any]) -> None:
    """Append one fine-tuning run (its provenance dict from :func:`mla_registry.finetune.finetune`)."""
    of(model).provenance.finetunes.append(copy.deepcopy(result))
