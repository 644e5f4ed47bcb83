"""Convert a model's attention with plugins and save it as a self-describing checkpoint (library entry point of
``mla-registry convert`` and of each converted variant in ``mla-registry run``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import checkpoint, models, surgery
from .calibration import CalibrationContext


def convert_model(model: nn.Module, processor, specs: list[str | surgery.AttentionSpec],
                  quiet: bool = True) -> dict:
    """Convert ``model`` in place; returns provenance (the specs, the calibration data used)."""
    parsed = [surgery.parse_spec(s) if isinstance(s, str) else s for s in specs]
    context = CalibrationContext(model, processor, quiet=quiet)
    surgery.convert(model, parsed, context)
    return {"attention_specs": [s.short() for s in parsed], "calibration": list(context.used.values())}


def convert_and_save(model_ref: str, specs: list[str], out: str | Path, device: str = "cpu",
                     dtype: str | None = None, quiet: bool = True) -> Path:
    """Load ``model_ref``, convert, save to ``out``; returns the checkpoint directory."""
    model, processor = models.load(model_ref, device=device, dtype=models.parse_dtype(dtype))
    prov = getattr(model, checkpoint.PROVENANCE_ATTR, {}) or {}
    history = list(prov.get("conversions", []))
    history.append({"source_model": model_ref, **convert_model(model, processor, specs, quiet=quiet)})
    return checkpoint.save(model, out, processor, provenance={"source_model": prov.get("source_model", model_ref),
                                                              "conversions": history})
