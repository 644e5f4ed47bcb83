"""The sets that ship with (or are built by) the package: ``builtin:real`` and ``builtin:tts-{test,valid,train}``."""

from __future__ import annotations

import csv
import functools
from collections import Counter
from pathlib import Path
from typing import Any

from mla_registry.errors import DataError

from . import tts
from .loaders import load_audiofolder
from .refs import Ref
from .utterance import Utterance, fingerprint

REAL_DIR = Path(__file__).resolve().parent.parent / "resources" / "real_speech"
TTS_NAMES = tuple(f"tts-{s}" for s in tts.SPLITS)
NAMES = ("real", *TTS_NAMES)


def real_sources() -> list[str]:
    """Folder names under resources/real_speech (each one audiofolder)."""
    return sorted(p.name for p in REAL_DIR.iterdir() if (p / "metadata.csv").is_file())


@functools.lru_cache(maxsize=1)
def real_rows() -> tuple[tuple[str, str, str], ...]:
    """(source, file_name, transcription) of every bundled real recording, in load order."""
    rows = []
    for source in real_sources():
        with open(REAL_DIR / source / "metadata.csv", newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                rows.append((source, r["file_name"], r["transcription"]))
    return tuple(rows)


def real_texts() -> list[str]:
    """Transcripts of the real recordings: never voiced into a TTS set."""
    return [t for _, _, t in real_rows()]


def _speaker(source: str, stem: str) -> str:
    if source.startswith("librispeech"):
        return stem.split("-")[0]
    if source == "ljspeech":
        return "lj"
    if source.startswith("cmu_arctic"):
        parts = stem.split("_")
        return parts[3] if stem.startswith("cmu_arctic_") and len(parts) > 3 else parts[0]
    return source


def _real_selection(ref: Ref) -> list[str]:
    opts = ref.take({"source": None})
    available = real_sources()
    if opts["source"] is None:
        return available
    wanted = [s.strip() for s in str(opts["source"]).split(",") if s.strip()]
    for s in wanted:
        if s not in available:
            raise DataError(f"{ref.raw}: unknown source {s!r}; builtin:real has {', '.join(available)}")
    return [s for s in available if s in wanted]


def _tts_params(ref: Ref) -> tuple[str, int, int]:
    split = ref.target[len("tts-") :]
    opts = ref.take({"size": str(tts.SPLITS[split]), "seed": str(tts.DEFAULT_SEED)})
    try:
        size, seed = int(str(opts["size"])), int(str(opts["seed"]))
    except ValueError as e:
        raise DataError(f"{ref.raw}: size and seed must be integers (got size={opts['size']!r}, "
                        f"seed={opts['seed']!r})") from e
    if size < 1:
        raise DataError(f"{ref.raw}: size must be at least 1, got {size}")
    if seed < 0:
        raise DataError(f"{ref.raw}: seed must be >= 0, got {seed}")
    return split, size, seed


def _check_name(ref: Ref) -> None:
    if ref.target not in NAMES:
        raise DataError(f"unknown builtin data set {ref.target!r} in {ref.raw!r}; available: "
                        + ", ".join(f"builtin:{n}" for n in NAMES))


def load(ref: Ref, *, limit: int | None, skip_bad: bool, quiet: bool, lazy: bool = False) -> list[Utterance]:
    """Load a builtin set (building and caching a TTS set on first use)."""
    _check_name(ref)
    if ref.target == "real":
        out: list[Utterance] = []
        for source in _real_selection(ref):
            if limit is not None and len(out) >= limit:
                break
            utts = load_audiofolder(
                ref.raw, str(REAL_DIR / source), limit=None if limit is None else limit - len(out),
                skip_bad=skip_bad, quiet=quiet, default_source=source, lazy=lazy,
            )
            for u in utts:
                stem = u.id
                u.id = f"{source}/{stem}"
                u.voice = f"real:{_speaker(source, stem)}"
                u.source = source
            out.extend(utts)
        return out

    split, size, seed = _tts_params(ref)
    if limit is not None and "size" not in ref.params and not skip_bad and limit < size:
        # a smaller set is a prefix of a larger one: read the first `limit` of the full set if it is built,
        # else synthesise only those (a calibration of 64 from builtin:tts-train builds 64, not all 600)
        full = tts.plan(split, size, seed, real_texts())
        if (tts.read_manifest(tts.set_dir(split, size, seed)) or {}).get("plan_key") != tts.plan_key(full):
            size = max(1, limit)
    items = tts.plan(split, size, seed, real_texts())
    target = tts.set_dir(split, size, seed)
    manifest = tts.read_manifest(target)
    if manifest is None or manifest.get("plan_key") != tts.plan_key(items):
        tts.build(ref.target, split, size, seed, items, target, quiet)
    utts = load_audiofolder(ref.raw, str(target), limit=limit, skip_bad=skip_bad, quiet=quiet,
                            default_source=f"tts:{split}", lazy=lazy)
    expected = [(it.id, it.text) for it in items][: len(utts)]
    if not skip_bad and [(u.id, u.text) for u in utts] != expected:
        raise DataError(f"{ref.raw}: the cached set in {target} does not match its plan; delete the directory "
                        "to rebuild it")
    return utts


def describe(ref: Ref) -> dict[str, Any]:
    """Provenance of a builtin set without decoding audio (a TTS set is not built by describing it)."""
    _check_name(ref)
    if ref.target == "real":
        sources = _real_selection(ref)
        rows = [r for r in real_rows() if r[0] in sources]
        pairs = [(f"{s}/{Path(f).with_suffix('').as_posix()}", t.strip()) for s, f, t in rows]
        return {
            "ref": ref.raw, "kind": "builtin:real", "size": len(pairs), "seed": None,
            "sources": dict(Counter(s for s, _, _ in rows)), "fingerprint": fingerprint(pairs),
            "path": str(REAL_DIR),
        }
    split, size, seed = _tts_params(ref)
    items = tts.plan(split, size, seed, real_texts())
    target = tts.set_dir(split, size, seed)
    manifest = tts.read_manifest(target) or {}
    out = {
        "ref": ref.raw, "kind": f"builtin:{ref.target}", "size": size, "seed": seed, "version": tts.VERSION,
        "voices": dict(Counter(it.voice for it in items)), "sources": dict(Counter(it.source for it in items)),
        "fingerprint": tts.plan_fingerprint(items), "path": str(target),
        "built": manifest.get("plan_key") == tts.plan_key(items),
    }
    for key in ("hibari", "espeak_ng", "audio_seconds", "build_seconds"):
        if key in manifest:
            out[key] = manifest[key]
    return out
