"""Whisper's English text normaliser, the one normaliser every WER in this project goes through.

WER differs by whole points between normalisers (distil-whisper#131), so every ``metrics.json`` names this one.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources

from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

_SPELLING = resources.files("mla_registry") / "resources" / "normalizer" / "english.json"


@functools.cache
def normalizer() -> EnglishTextNormalizer:
    """transformers' ``EnglishTextNormalizer`` with Whisper's British→American spelling map (MIT)."""
    return EnglishTextNormalizer(json.loads(_SPELLING.read_text(encoding="utf-8")))


def normalize(text: str) -> str:
    """Lower-case, expand contractions, spell numbers as digits, drop punctuation, American spelling."""
    return normalizer()(text)


@functools.cache
def name() -> str:
    """An exact name for the normaliser, recorded in results so numbers are never compared across normalisers."""
    digest = hashlib.sha256(_SPELLING.read_bytes()).hexdigest()[:12]
    return f"whisper-english (transformers EnglishTextNormalizer, english.json sha256:{digest})"


def for_language(language: str | None):
    """``(normalise, name)`` for references in ``language``: Whisper's English normaliser for English (or an
    unset language, the English-only models' case), its ``BasicTextNormalizer`` (lower case, no punctuation or
    diacritics, no English spelling rules) for every other language."""
    if language in (None, "en", "english"):
        return normalize, name()
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    basic = BasicTextNormalizer(remove_diacritics=False, split_letters=False)
    return basic, "whisper-basic (transformers BasicTextNormalizer)"
