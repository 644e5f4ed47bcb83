"""Self-describing checkpoints: a Hugging Face model directory plus ``mla_registry.json``, the attention manifest.

The manifest records, per converted slot, the plugin that built it, the plugin's version and package, and the
kwargs that shape it; :func:`load` rebuilds the base architecture from ``config.json``, rebuilds every recorded
slot through the registry, and loads the safetensors weights strictly. Nothing is unpickled and no code named by
the checkpoint is imported: plugin names resolve only through installed, registered plugins.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration
from transformers.initialization import no_init_weights

from . import __version__, lineage, whisper
from . import checkpoint_files as files
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
    """The manifest of ``ckpt_dir``, or None for a plain Hugging Face directory; clear errors when unreadable or
    of the wrong shape (each naming the key at fault)."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.exists():
        return None
    manifest = files.json_object(path, "manifest")
    _check_format(path, manifest)
    _check_written_by(path, manifest.get("written_by"))
    if "slots" not in manifest:
        raise CheckpointError(f"{path}: 'slots' is missing (a list of converted slots; [] when none)")
    if not isinstance(manifest["slots"], list):
        raise CheckpointError(f"{path}: 'slots' must be a list, got {type(manifest['slots']).__name__}")
    family = manifest.get("family", whisper.FAMILY)
    if family != whisper.FAMILY:
        raise CheckpointError(f"{path}: model family {family!r}; this mla-registry converts and loads "
                              f"{whisper.FAMILY!r} models only")
    return manifest


def _check_format(path: Path, manifest: dict[str, Any]) -> None:
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{path}: 'format_version' is missing or not an integer, got {version!r:.60}")
    if version > FORMAT_VERSION:
        written_by = manifest.get("written_by")
        writer = written_by.get("mla_registry", "?") if isinstance(written_by, dict) else "?"
        raise CheckpointError(
            f"{path}: manifest format {version} ('format_version') was written by mla-registry {writer!s:.40}; "
            f"this mla-registry {__version__} reads format {FORMAT_VERSION} at most. Upgrade: pip install -U "
            "mla-registry"
        )
    if version not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: 'format_version' {version} is not a format mla-registry ever wrote "
                              f"(readable: {', '.join(map(str, READABLE_FORMATS))})")


def _check_written_by(path: Path, written_by: Any) -> None:
    """``written_by`` is an object of version strings (read only for messages, but any other shape means the
    file was not written by mla-registry)."""
    if written_by is None:
        return
    if not isinstance(written_by, dict) or not all(isinstance(v, str) for v in written_by.values()):
        raise CheckpointError(f"{path}: 'written_by' must be an object of version strings "
                              f"({{\"mla_registry\": \"0.1.0\", ...}}), got {written_by!r:.60}")


def _check_architecture(ckpt_dir: Path, model: nn.Module, state: dict[str, torch.Tensor],
                        origin: dict[str, Path], records: list[SlotRecord]) -> None:
    """Every tensor the file holds fits the rebuilt module it lands in; a mismatch names the tensor, both
    shapes, and what decided the expected one (the slot's kwargs from the manifest, or config.json)."""
    expected = model.state_dict()
    files.check_tensors(state, origin, expected)
    by_path = {r.path: r for r in records}
    for key, tensor in state.items():
        want = expected.get(key)
        if want is None or want.shape == tensor.shape:
            continue
        rec = next((r for p, r in by_path.items() if key.startswith(p + ".")), None)
        why = (f"slot {rec.slot} is rebuilt by plugin '{rec.plugin}' with kwargs {rec.kwargs} from {MANIFEST}"
               if rec else f"config.json (d_model={model.config.d_model}) decides it")
        raise CheckpointError(f"{origin.get(key, ckpt_dir)}: weights do not fit the rebuilt architecture: tensor "
                              f"{key!r} has shape {list(tensor.shape)}, the model expects {list(want.shape)} "
                              f"({why})")


def load(ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the model saved in ``ckpt_dir`` (with or without a manifest) and load its weights strictly."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").exists():
        raise CheckpointError(f"{ckpt_dir}: not a model directory (no config.json)")
    manifest = read_manifest(ckpt_dir) or {"slots": [], "provenance": {}}
    records = slot_records(manifest, ckpt_dir / MANIFEST)
    provenance = provenance_of(manifest, ckpt_dir / MANIFEST)
    config = files.read_config(ckpt_dir)
    model = _empty_model(ckpt_dir, config)
    try:
        rebuild(model, records, where=str(ckpt_dir / MANIFEST))
    except MlaRegistryError as exc:
        raise type(exc)(f"cannot rebuild {ckpt_dir} from {MANIFEST}: {exc}") from None
    state, origin = files.read_weights(ckpt_dir)
    _check_architecture(ckpt_dir, model, state, origin, records)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # what _check_architecture does not foresee
        raise CheckpointError(f"{ckpt_dir}: weights do not fit the rebuilt architecture: {exc}") from None
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{ckpt_dir}: weights do not match the rebuilt architecture; missing: {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}; unexpected: {result.unexpected_keys[:8]}"
            f"{'...' if len(result.unexpected_keys) > 8 else ''}"
            + ("" if (ckpt_dir / MANIFEST).exists() else
               f" ({MANIFEST} is absent, so the directory was read as a plain Whisper; converted attention is "
               "rebuilt only from its manifest)")
        )
    model.tie_weights()
    if (ckpt_dir / "generation_config.json").exists():
        model.generation_config = _generation_config(ckpt_dir)
    lineage.attach(model, Lineage(records, provenance))
    return model.to(device=device, dtype=dtype).eval()


def _empty_model(ckpt_dir: Path, config: WhisperConfig) -> nn.Module:
    with no_init_weights():
        try:
            return WhisperForConditionalGeneration(config)
        except (ValueError, RuntimeError, ArithmeticError, TypeError) as exc:  # a config check_config missed
            raise CheckpointError(f"{ckpt_dir / 'config.json'}: cannot build a model from it: "
                                  f"{type(exc).__name__}: {exc}") from None


def _generation_config(ckpt_dir: Path) -> GenerationConfig:
    path = ckpt_dir / "generation_config.json"
    files.json_object(path, "generation config")
    try:
        return GenerationConfig.from_pretrained(ckpt_dir)
    except Exception as exc:  # noqa: BLE001 - transformers' validation of the file's values
        raise CheckpointError(f"{path}: transformers refuses this generation config: {exc}") from None


def slot_records(manifest: dict[str, Any], where: Path) -> list[SlotRecord]:
    """The manifest's slot records, each checked for the fields a rebuild needs and their types."""
    out = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(manifest.get("slots") or []):
        at = f"{where}: slots[{i}]"
        _check_record(at, rec)
        if rec["path"] in seen:
            raise CheckpointError(f"{at}: path {rec['path']!r} is already slots[{seen[rec['path']]}]")
        seen[rec["path"]] = i
        out.append(SlotRecord(slot=rec.get("slot") or rec["path"], path=rec["path"], plugin=rec["plugin"],
                              plugin_version=rec.get("plugin_version", ""), package=rec.get("package", ""),
                              kwargs=rec.get("kwargs", {}), convert_kwargs=rec.get("convert_kwargs", {})))
    return out


def _check_record(at: str, rec: Any) -> None:
    if not isinstance(rec, dict):
        raise CheckpointError(f"{at} must be an object with 'path', 'plugin' and 'kwargs', got {rec!r:.80}")
    for key in ("path", "plugin"):
        if not isinstance(rec.get(key), str) or not rec[key]:
            raise CheckpointError(f"{at}: '{key}' is missing or not a non-empty string, got {rec.get(key)!r:.60}")
    for key in ("slot", "plugin_version", "package"):
        if key in rec and not isinstance(rec[key], str):
            raise CheckpointError(f"{at}: {key} must be a string, got {type(rec[key]).__name__} {rec[key]!r:.60}")
    for key in ("kwargs", "convert_kwargs"):
        if key in rec and not isinstance(rec[key], dict):
            raise CheckpointError(f"{at}: {key} must be an object, got {rec[key]!r:.80}")


def provenance_of(manifest: dict[str, Any], where: Path | None = None) -> Provenance:
    """The manifest's provenance; format 1 kept the last fine-tune apart from the earlier ones."""
    at = where or MANIFEST
    prov = manifest.get("provenance") or {}
    if not isinstance(prov, dict):
        raise CheckpointError(f"{at}: provenance must be an object, got {prov!r:.60}")
    prov = dict(prov)
    if manifest.get("format_version") == 1 and "finetunes" not in prov:
        prov["finetunes"] = [*prov.get("finetune_history", []), *([prov["finetune"]] if prov.get("finetune") else [])]
    for key in ("conversions", "finetunes"):
        value = prov.get(key, [])
        if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
            raise CheckpointError(f"{at}: provenance.{key} must be a list of objects, got {value!r:.60}")
    return Provenance.from_json(prov)
