"""Dispatch of ``mla-registry export`` and the provenance file every export writes beside its files.

The provenance names the source checkpoint, a fingerprint of its manifest and of its weights file, and the
versions that wrote the export, so an exported model found on its own can be traced back to the checkpoint
(and the conversion and fine-tuning history its manifest records)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
import transformers

from .. import __version__, checkpoint, fingerprint
from ..errors import CheckpointError, ExportError

PROVENANCE = "mla_registry_export.json"
FORMATS = ("transformers", "ctranslate2", "onnx")


def provenance(ckpt_dir: str | Path, fmt: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """What :data:`PROVENANCE` records for an export of ``ckpt_dir`` to ``fmt``."""
    ckpt_dir = Path(ckpt_dir)
    manifest = checkpoint.read_manifest(ckpt_dir) or {}
    return {
        "format": fmt,
        "source_checkpoint": str(ckpt_dir.resolve()),
        "manifest_fingerprint": fingerprint.of_json(manifest),
        "weights_sha256": fingerprint.of_file(ckpt_dir / "model.safetensors"),
        "attention": [{"slot": s.get("slot"), "plugin": s.get("plugin"), "kwargs": s.get("kwargs")}
                      for s in manifest.get("slots", [])],
        "source_provenance": manifest.get("provenance", {}),
        "exported_by": {"mla_registry": __version__, "transformers": transformers.__version__,
                        "torch": torch.__version__, "python": platform.python_version()},
        **(details or {}),
    }


def read_provenance(export_dir: str | Path) -> dict[str, Any]:
    """The provenance an export wrote; an :class:`ExportError` when the directory has none."""
    path = Path(export_dir) / PROVENANCE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: no readable export provenance ({exc}); was this directory written by "
                          "mla-registry export?") from None


def check_out(out: str | Path, overwrite: bool) -> Path:
    """Refuse to write into a non-empty directory unless it is a previous export and ``overwrite`` is set."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / PROVENANCE).is_file():
            raise ExportError(f"--out {out}: a non-empty directory that is not an mla-registry export; choose an "
                              "empty or new directory (nothing was written)")
        if not overwrite:
            raise ExportError(f"--out {out}: already holds an export; pass --overwrite to replace it")
    return out


def export(ckpt: str | Path, fmt: str, out: str | Path, *, quantization: str | None = None,
           overwrite: bool = False, quiet: bool = True) -> dict[str, Any]:
    """Export checkpoint ``ckpt`` to ``fmt`` in ``out``; returns the provenance written there (with what the
    format keeps, e.g. the cache per token)."""
    if fmt not in FORMATS:
        raise ExportError(f"--to {fmt!r}: allowed formats: {', '.join(FORMATS)}")
    ckpt = Path(ckpt).expanduser()
    if not checkpoint.is_checkpoint(ckpt) and not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{ckpt}: not a model directory (no config.json)")
    out = check_out(out, overwrite)
    if quantization is not None and fmt != "ctranslate2":
        raise ExportError(f"--quantization {quantization}: only --to ctranslate2 quantizes")
    if fmt == "transformers":
        from .stock import export_transformers

        return export_transformers(ckpt, out)
    if fmt == "ctranslate2":
        from .ct2 import export_ctranslate2

        return export_ctranslate2(ckpt, out, quantization=quantization or "float32")
    from .onnx import export_onnx

    return export_onnx(ckpt, out, quiet=quiet)
