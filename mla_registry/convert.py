"""Convert a model's attention with plugins, with calibration audio when a plugin asks for it, and record the
conversion in the model's lineage (the library side of ``mla-registry convert`` and of every converted variant
of ``mla-registry run``). :mod:`mla_registry.surgery` selects the slots and swaps the modules in."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import checkpoint, lineage, model_refs, surgery
from .calibration import CalibrationContext, CalibrationSettings, CapturedInputs
from .lineage import SlotRecord


def convert_model(model: nn.Module, processor, specs: list[str | surgery.AttentionSpec],
                  calibration: CalibrationSettings = CalibrationSettings(), source_model: str | None = None,
                  quiet: bool = True, captured: CapturedInputs | None = None) -> list[SlotRecord]:
    """Convert ``model`` in place and record the conversion (specs, the calibration data actually used) in its
    lineage; returns the records of every converted slot. Calibration records the inputs of the converted slots
    only; ``captured`` keeps them for later conversions of the same weights (an experiment's variants)."""
    parsed = [surgery.parse_spec(s) if isinstance(s, str) else s for s in specs]
    paths = [p.slot.path for p in surgery.plan(model, parsed)]
    context = CalibrationContext(model, processor, calibration, quiet=quiet, paths=paths, shared=captured)
    records = surgery.replace_slots(model, parsed, context)
    lineage.record_conversion(model, source_model, [s.short() for s in parsed], context.used)
    return records


def convert_and_save(model_ref: str, specs: list[str], out: str | Path,
                     calibration: CalibrationSettings = CalibrationSettings(), device: str = "cpu",
                     dtype: str | None = None, overwrite: bool = False, quiet: bool = True) -> Path:
    """Load ``model_ref``, convert, save to ``out`` (refusing to touch what is there unless it is a checkpoint
    and ``overwrite``); returns the checkpoint directory."""
    checkpoint.check_target(out, overwrite)  # before the work, not after
    model, processor = model_refs.load(model_ref, device=device, dtype=model_refs.parse_dtype(dtype))
    convert_model(model, processor, specs, calibration, source_model=model_ref, quiet=quiet)
    return checkpoint.save(model, out, processor, overwrite=overwrite)
