"""Sentences for the synthesised sets: read the bundled corpora, keep clean moderate-length sentences, drop any
that overlap a real recording's transcript, and assign each sentence to one split by a hash of its normalised
text (so tts-test, tts-valid and tts-train never share a sentence, whatever their size or seed)."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mla_registry.errors import DataError

TEXT_DIR = Path(__file__).resolve().parent.parent / "resources" / "text"

#: corpus group -> bundled files (LibriSpeech test-clean is left out: LibriTTS test-clean re-segments the same
#: recordings, so using both would put near-duplicate sentences into different splits).
CORPORA: dict[str, tuple[str, ...]] = {
    "harvard": ("harvard_sentences.txt",),
    "arctic": ("cmu_arctic_prompts.tsv",),
    "ljspeech": ("ljspeech.tsv",),
    "librispeech": ("librispeech_dev_clean_2.tsv", "librispeech_train_clean_5.tsv"),
    "libritts": ("libritts_test_clean.tsv", "libritts_test_other.tsv"),
}

MIN_WORDS, MAX_WORDS = 5, 30
#: share of the sentence pool per split (by hash of the normalised text, in percent)
SPLIT_PERCENT = {"test": 15, "valid": 10, "train": 75}
#: a candidate sharing this many consecutive words with a real transcript is excluded
OVERLAP_NGRAM = 6

_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z ,.;:!?'\-]*$")
_QUOTES = str.maketrans({"\u201c": "", "\u201d": "", '"': "", "\u2018": "'", "\u2019": "'"})
_I_WORDS = re.compile(r"\bi(?=\b|')")


@dataclass(frozen=True)
class Sentence:
    """One candidate sentence: corpus group, id inside its corpus file, text to voice and transcribe."""

    corpus: str
    sid: str
    text: str


def normalise(text: str) -> str:
    """Lower case, letters/digits/apostrophes only, single spaces: the key for overlap and split hashing."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return " ".join(w.strip("'") for w in text.split() if w.strip("'"))


def _clean(text: str, upper_case_corpus: bool) -> str | None:
    """The sentence as it will be voiced, or None when it has digits, odd symbols or a bad length."""
    text = " ".join(text.translate(_QUOTES).split())
    if upper_case_corpus:  # LibriSpeech: upper case, no punctuation -> sentence case, pronoun "I" kept
        text = _I_WORDS.sub("I", text.lower())
        text = text[:1].upper() + text[1:] + "."
    if not _ALLOWED.match(text) or "--" in text or " -" in text or "- " in text:
        return None
    if not text[0].isupper():  # fragments that start mid-sentence (LJ Speech continuation lines)
        return None
    n = len(text.split())
    if not MIN_WORDS <= n <= MAX_WORDS:
        return None
    text = text.rstrip(",;:-' ")
    if text[-1] not in ".!?":
        text += "."
    return text


def _read(corpus: str, name: str) -> list[tuple[str, str]]:
    path = TEXT_DIR / name
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read bundled text corpus {path}: {e}") from e
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if name.endswith(".tsv"):
            sid, _, text = line.partition("\t")
            if not text:
                raise DataError(f"{path} line {i + 1}: expected ID<TAB>TEXT")
        else:
            sid, text = f"{i // 10 + 1:02d}-{i % 10 + 1:02d}", line  # Harvard list-sentence
        rows.append((sid, text))
    return rows


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def excluded_by(real_texts: list[str]) -> Callable[[str], bool]:
    """A predicate that is true for a text matching a real transcript: equal or contained (either way) after
    normalisation, or sharing ``OVERLAP_NGRAM`` consecutive words with one."""
    norms = [normalise(t) for t in real_texts]
    exact = set(norms)
    grams: set[tuple[str, ...]] = set()
    for t in norms:
        grams |= _ngrams(t.split(), OVERLAP_NGRAM)

    def hit(text: str) -> bool:
        n = normalise(text)
        if n in exact or any(n in r or r in n for r in norms):
            return True
        return bool(_ngrams(n.split(), OVERLAP_NGRAM) & grams)

    return hit


def split_of(text: str) -> str:
    """The split a sentence belongs to, from a hash of its normalised text."""
    h = int.from_bytes(hashlib.sha256(normalise(text).encode()).digest()[:8], "big") % 100
    acc = 0
    for split, pct in SPLIT_PERCENT.items():
        acc += pct
        if h < acc:
            return split
    raise AssertionError("split percentages must sum to 100")


@functools.lru_cache(maxsize=1)
def _pools(real_key: tuple[str, ...]) -> dict[str, dict[str, list[Sentence]]]:
    hit = excluded_by(list(real_key))
    seen: set[str] = set()
    pools: dict[str, dict[str, list[Sentence]]] = {s: {c: [] for c in CORPORA} for s in SPLIT_PERCENT}
    for corpus, files in CORPORA.items():
        for name in files:
            for sid, raw in _read(corpus, name):
                text = _clean(raw, upper_case_corpus=corpus == "librispeech")
                if text is None:
                    continue
                key = normalise(text)
                if key in seen or hit(text):
                    continue
                seen.add(key)
                pools[split_of(text)][corpus].append(Sentence(corpus, sid, text))
    return pools


def sentence_pool(split: str, real_texts: list[str]) -> dict[str, list[Sentence]]:
    """Clean, deduplicated sentences of ``split`` grouped by corpus, none overlapping ``real_texts``."""
    if split not in SPLIT_PERCENT:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_PERCENT)}")
    return _pools(tuple(real_texts))[split]
