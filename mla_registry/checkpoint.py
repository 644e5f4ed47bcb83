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

from . import __version__, lineage, whisper
from .atomic import atomic_dir, write_json
from .errors import CheckpointError, MlaRegistryError
from .lineage import Lineage, Provenance, SlotRecord
from .surgery import rebuild

MANIFEST = "mla_registry.json"
FORMAT_VERSION = 2  # 2: provenance keeps every fine-tune in "finetunes" (format 1 had "finetune" + history)
READABLE_FORMATS = (1, 2)


def manifest_for(model: nn.Module) -> dict[str, Any]:
    """The manifest that describes ``model``'s attention and where it came from (its :mod:`lineage`)."""
    lin = lineage.of(model)
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
        "slots": [r.to_json() for r in lin.slots],
        "provenance": lin.provenance.to_json(),
    }


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory this package wrote (a manifest beside a config)."""
    path = Path(path)
    return (path / MANIFEST).is_file() and (path / "config.json").is_file()


def check_target(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse to write a checkpoint where it would destroy something the user owns: a non-empty directory that
    is not an mla-registry checkpoint (never), an existing checkpoint (only with ``overwrite``), a file, or a
    directory that holds the current working directory."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; choose another --out")
    try:
        cwd = Path.cwd().resolve()
        if out.exists() and (cwd == out.resolve() or out.resolve() in cwd.parents):
            raise CheckpointError(f"{out}: is (or contains) the current working directory; choose another --out")
    except FileNotFoundError:  # the cwd was deleted under us: nothing to protect there
        pass
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_checkpoint(out):
        raise CheckpointError(f"{out}: is a non-empty directory that is not an mla-registry checkpoint; nothing "
                              "was written (its files are left as they are). Choose an empty or new --out")
    if not overwrite:
        raise CheckpointError(f"{out}: already holds a checkpoint; pass --overwrite (overwrite=True) to replace it")


def save(model: nn.Module, out_dir: str | Path, processor=None, overwrite: bool = False) -> Path:
    """Write ``model`` (and ``processor``) to ``out_dir`` atomically: config, generation config, safetensors
    weights, processor files, and the manifest (slots and provenance from the model's lineage). An existing
    checkpoint is replaced only with ``overwrite``; anything else already there is never touched
    (:func:`check_target`). Returns the directory."""
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    manifest = manifest_for(model)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a one-file save needs no "Writing model shards" bar
    try:
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if processor is not None:
                processor.save_pretrained(tmp)
            write_json(tmp / MANIFEST, manifest)
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
    if version not in READABLE_FORMATS and version > FORMAT_VERSION:
        writer = manifest.get("written_by", {}).get("mla_registry", "?")
        raise CheckpointError(
            f"{path}: manifest format {version} was written by mla-registry {writer}; this mla-registry "
            f"{__version__} reads format {FORMAT_VERSION} at most. Upgrade: pip install -U mla-registry"
        )
    if not isinstance(manifest.get("slots", []), list):
        raise CheckpointError(f"{path}: 'slots' must be a list")
    family = manifest.get("family", whisper.FAMILY)
    if family != whisper.FAMILY:
        raise CheckpointError(f"{path}: model family {family!r}; this mla-registry converts and loads "
                              f"{whisper.FAMILY!r} models only")
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
    records = slot_records(manifest, ckpt_dir / MANIFEST)
    config = WhisperConfig.from_pretrained(ckpt_dir)
    with no_init_weights():
        model = WhisperForConditionalGeneration(config)
    try:
        rebuild(model, records, where=str(ckpt_dir / MANIFEST))
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
    lineage.attach(model, Lineage(records, provenance_of(manifest)))
    return model.to(device=device, dtype=dtype).eval()


def slot_records(manifest: dict[str, Any], where: Path) -> list[SlotRecord]:
    """The manifest's slot records, each checked for the fields a rebuild needs."""
    out = []
    for i, rec in enumerate(manifest.get("slots") or []):
        at = f"{where}: slots[{i}]"
        if not isinstance(rec, dict):
            raise CheckpointError(f"{at} must be an object with 'path', 'plugin' and 'kwargs', got {rec!r:.80}")
        for key, kind in (("path", str), ("plugin", str)):
            if not isinstance(rec.get(key), kind):
                raise CheckpointError(f"{at}: '{key}' is missing or not a string")
        kwargs = rec.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise CheckpointError(f"{at}: 'kwargs' must be an object, got {kwargs!r:.80}")
        out.append(SlotRecord(slot=str(rec.get("slot") or rec["path"]), path=rec["path"], plugin=rec["plugin"],
                              plugin_version=str(rec.get("plugin_version", "")),
                              package=str(rec.get("package") or ""), kwargs=kwargs,
                              convert_kwargs=dict(rec.get("convert_kwargs") or {})))
    return out


def provenance_of(manifest: dict[str, Any]) -> Provenance:
    """The manifest's provenance; format 1 kept the last fine-tune apart from the earlier ones."""
    prov = dict(manifest.get("provenance") or {})
    if manifest.get("format_version") == 1 and "finetunes" not in prov:
        prov["finetunes"] = [*prov.get("finetune_history", []), *([prov["finetune"]] if prov.get("finetune") else [])]
    return Provenance.from_json(prov)
