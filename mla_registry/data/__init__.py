"""Audio datasets for evaluation and fine-tuning, named by one reference string (CLI ``--data REF``, YAML).

Reference syntax
----------------
``builtin:real[?source=NAME[,NAME]]``
    The 57 bundled recordings of real English speech (LibriSpeech dev/test-clean, LJ Speech, CMU ARCTIC, JFK),
    sources: cmu_arctic_samples, jfk, librispeech_dev_clean, librispeech_test_clean, ljspeech.
    Ids are ``SOURCE/FILE_STEM``; voice is ``real:SPEAKER``.
``builtin:tts-test`` | ``builtin:tts-valid`` | ``builtin:tts-train`` ``[?size=N&seed=S]``
    Sentences from bundled corpora (Harvard, CMU ARCTIC, LJ Speech, LibriSpeech, LibriTTS; see
    resources/text/SOURCES.md) voiced half by hibari-tts (neural, bundled voice at speeds 1.0, 0.9, 1.15) and half
    by four espeak-ng voices (``mla_registry.data.tts.VOICE_MIX``). Defaults: size 304 / 104 / 600, seed 0; the
    same (size, seed) always gives the same set, and a smaller size is a prefix of a larger one. Splits never share
    a sentence, and no transcript of ``builtin:real`` is voiced. Built on first use (about 10 s for tts-test on two
    cores) into ``cache_dir("data")`` as an audiofolder; needs espeak-ng and hibari-tts (a DataError saying how
    to install them otherwise: a hibari-only fallback would silently change the test set).
``DIR``
    A local audiofolder: ``metadata.csv`` with ``file_name,transcription`` and optional ``voice``, ``source``,
    ``id`` columns, read by ``datasets.load_dataset("audiofolder", data_dir=DIR)``. Ids: the ``id`` column, else
    the file's path relative to DIR without its extension. (A folder that datasets splits by sub-folder names such
    as train/test: use ``hf:DIR?split=NAME``.)
``FILE.csv``
    The same columns in a CSV file; file names are relative to the CSV's folder.
``hf:NAME_OR_DIR[?config=C&split=S&text=COL&audio=COL&id=COL&revision=R&streaming=true]``
    ``datasets.load_dataset(NAME, C, split=S)``: a hub id (e.g. ``hf:openslr/librispeech_asr?config=clean&split=test``)
    or a local directory in the hub layout (parquet shards under ``data/``). The text column defaults to the first
    of text, sentence, transcription, normalized_text; ids come from an ``id`` column, else the row index. The split
    may be left out when the dataset has only one.

Whatever the source, audio is decoded by torchcodec through ``Audio(sampling_rate=16000)`` and the channels are
averaged: float32 mono 16 kHz. An unreadable, empty or silent (peak < 1e-4) file is a
:class:`~mla_registry.errors.DataError` naming it; ``skip_bad=True`` skips such files and warns how many and which.
"""

from __future__ import annotations

from typing import Any

from mla_registry.errors import DataError

from . import builtin as _builtin
from . import loaders as _loaders
from .refs import parse
from .utterance import SAMPLE_RATE, Utterance, fingerprint

__all__ = ["SAMPLE_RATE", "Utterance", "describe", "fingerprint", "fingerprint_of", "load", "parse"]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None (0 utterances is no test set), got {limit!r}")


def load(ref: str, *, limit: int | None = None, skip_bad: bool = False, quiet: bool = False,
         lazy: bool = False) -> list[Utterance]:
    """Resolve ``ref`` (syntax in the module docstring) to utterances: float32 mono 16 kHz audio + transcript.
    ``limit`` keeps the first N usable utterances; ``skip_bad`` skips unreadable/empty/silent files (with a
    warning) instead of raising; ``quiet`` hides progress bars. ``lazy`` reads ids and transcripts now and each
    file's audio when the utterance's audio is asked for (what evaluation does, batch by batch, so a large test
    set is never all in memory; with ``skip_bad`` every file is read first, to find the bad ones)."""
    _check_limit(limit)
    r = parse(ref)
    if r.kind == "builtin":
        return _builtin.load(r, limit=limit, skip_bad=skip_bad, quiet=quiet, lazy=lazy)
    if r.kind == "audiofolder":
        r.take({})
        return _loaders.load_audiofolder(r.raw, r.target, limit=limit, skip_bad=skip_bad, quiet=quiet, lazy=lazy)
    if r.kind == "csv":
        r.take({})
        return _loaders.load_csv(r.raw, r.target, limit=limit, skip_bad=skip_bad, quiet=quiet, lazy=lazy)
    opts = r.take(_loaders.HF_OPTIONS)
    return _loaders.load_hf(r.raw, r.target, opts, limit=limit, skip_bad=skip_bad, quiet=quiet, lazy=lazy)


def fingerprint_of(utterances: list[Utterance]) -> str:
    """Fingerprint of loaded utterances (ids and texts), comparable with ``describe(ref)["fingerprint"]``."""
    return fingerprint((u.id, u.text) for u in utterances)


def describe(ref: str) -> dict[str, Any]:
    """Provenance to record with results: the ref, its resolved kind, size, seed (TTS sets), the sha256
    fingerprint of ids+transcripts in order, and where the data lives. Does not decode audio."""
    r = parse(ref)
    if r.kind == "builtin":
        return _builtin.describe(r)
    if r.kind == "csv":
        r.take({})
        return _loaders.describe_csv(r.raw, r.target)
    if r.kind == "audiofolder":
        r.take({})
        return _loaders.describe_dataset(r.raw, "audiofolder", r.target, None)
    opts = r.take(_loaders.HF_OPTIONS)
    return _loaders.describe_dataset(r.raw, "hf", r.target, opts)
