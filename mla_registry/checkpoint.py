"""Self-describing checkpoints: a Hugging Face model directory plus ``mla_registry.json``, the attention manifest.

The manifest records, per converted slot, the plugin that built it, the plugin's version and package, and the
kwargs that shape it; :func:`load` rebuilds the base architecture from ``config.json``, rebuilds every recorded
slot through the registry, and loads the safetensors weights strictly. Nothing is unpickled and no code named by
the checkpoint is imported: plugin names resolve only through installed, registered plugins.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import transformers
from torch import nn
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration
from transformers.initialization import no_init_weights

from . import __version__
from .cache import atomic_dir, write_json_atomic
from .errors import CheckpointError, MlaRegistryError
from .families import whisper
from .surgery import SLOTS_ATTR, rebuild

MANIFEST = "mla_registry.json"
FORMAT_VERSION = 1
PROVENANCE_ATTR = "mla_registry_provenance"


def manifest_for(model: nn.Module, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest that describes ``model``'s attention and where it came from."""
    prov = dict(getattr(model, PROVENANCE_ATTR, {}) or {})
    prov.update(provenance or {})
    return {
        "format_version": FORMAT_VERSION,
        "written_by": {
            "mla_registry": __version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "family": whisper.FAMILY,
        "base_model_type": model.config.model_type,
        "base_architecture": type(model).__name__,
        "slots": list(getattr(model, SLOTS_ATTR, [])),
        "provenance": prov,
    }


def save(model: nn.Module, out_dir: str | Path, processor=None, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and ``processor``) to ``out_dir`` atomically: config, generation config, safetensors
    weights, processor files, and the manifest. Returns the directory."""
    out_dir = Path(out_dir)
    manifest = manifest_for(model, provenance)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a one-file save needs no "Writing model shards" bar
    try:
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if processor is not None:
                processor.save_pretrained(tmp)
            write_json_atomic(tmp / MANIFEST, manifest)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return out_dir


def read_manifest(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of ``ckpt_dir``, or None for a plain Hugging Face directory; clear errors when unreadable."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the manifest: {exc}") from None
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: 'format_version' is missing or not an integer")
    if version > FORMAT_VERSION:
        writer = manifest.get("written_by", {}).get("mla_registry", "?")
        raise CheckpointError(
            f"{path}: manifest format {version} was written by mla-registry {writer}; this mla-registry "
            f"{__version__} reads format {FORMAT_VERSION} at most. Upgrade: pip install -U mla-registry"
        )
    if not isinstance(manifest.get("slots", []), list):
        raise CheckpointError(f"{path}: 'slots' must be a list")
    return manifest


def _state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    single = ckpt_dir / "model.safetensors"
    index = ckpt_dir / "model.safetensors.index.json"
    if single.exists():
        return safetensors.torch.load_file(single)
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(safetensors.torch.load_file(ckpt_dir / f))
        return out
    raise CheckpointError(f"{ckpt_dir}: no model.safetensors (or model.safetensors.index.json) in this directory")


def load(ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the model saved in ``ckpt_dir`` (with or without a manifest) and load its weights strictly."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").exists():
        raise CheckpointError(f"{ckpt_dir}: not a model directory (no config.json)")
    manifest = read_manifest(ckpt_dir) or {"slots": [], "provenance": {}}
    config = WhisperConfig.from_pretrained(ckpt_dir)
    with no_init_weights():
        model = WhisperForConditionalGeneration(config)
    try:
        rebuild(model, manifest["slots"], where=str(ckpt_dir / MANIFEST))
    except MlaRegistryError as exc:
        raise type(exc)(f"cannot rebuild {ckpt_dir}: {exc}") from None
    state = _state_dict(ckpt_dir)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{ckpt_dir}: weights do not fit the rebuilt architecture: {exc}") from None
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{ckpt_dir}: weights do not match the rebuilt architecture; missing: {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}; unexpected: {result.unexpected_keys[:8]}"
            f"{'...' if len(result.unexpected_keys) > 8 else ''}"
        )
    model.tie_weights()
    if (ckpt_dir / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(ckpt_dir)
    setattr(model, PROVENANCE_ATTR, manifest.get("provenance", {}))
    return model.to(device=device, dtype=dtype).eval()
