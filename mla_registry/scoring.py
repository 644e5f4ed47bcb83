"""Word and character error rates through jiwer (4.x), after Whisper's English normaliser.

Totals are summed edit counts over utterances (corpus WER = (S + D + I) / N), never a mean of per-utterance
rates; per-group rates (by voice, by source) are computed the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jiwer

from .normalize import normalize


def _counts(ref: str, hyp: str, chars: bool = False) -> dict[str, int]:
    if not ref:  # jiwer refuses empty references: every hypothesis unit is an insertion
        n = len(hyp) if chars else len(hyp.split())
        return {"hits": 0, "substitutions": 0, "deletions": 0, "insertions": n, "ref": 0}
    out = (jiwer.process_characters if chars else jiwer.process_words)(ref, hyp)
    return {"hits": out.hits, "substitutions": out.substitutions, "deletions": out.deletions,
            "insertions": out.insertions, "ref": out.hits + out.substitutions + out.deletions}


def score_utterance(reference: str, hypothesis: str, normalise=normalize) -> dict[str, Any]:
    """Normalised forms and word/character edit counts of one utterance (Whisper's English normaliser unless
    another is given: :func:`mla_registry.normalize.for_language`)."""
    ref_n, hyp_n = normalise(reference).strip(), normalise(hypothesis).strip()
    return {"reference_norm": ref_n, "hypothesis_norm": hyp_n,
            "words": _counts(ref_n, hyp_n), "chars": _counts(ref_n, hyp_n, chars=True)}


def _rate(c: dict[str, int]) -> float:
    errors = c["substitutions"] + c["deletions"] + c["insertions"]
    return errors / c["ref"] if c["ref"] else float(errors > 0)


def totals(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """WER, CER and the edit counts summed over ``records`` (each from :func:`score_utterance`)."""
    w = {"hits": 0, "substitutions": 0, "deletions": 0, "insertions": 0, "ref": 0}
    c = dict(w)
    n = 0
    for r in records:
        n += 1
        for k in w:
            w[k] += r["words"][k]
            c[k] += r["chars"][k]
    return {"utterances": n, "wer": _rate(w), "cer": _rate(c), "ref_words": w["ref"],
            "substitutions": w["substitutions"], "deletions": w["deletions"], "insertions": w["insertions"],
            "errors": w["substitutions"] + w["deletions"] + w["insertions"]}


def by_group(records: Sequence[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """:func:`totals` per value of ``key`` (``voice`` or ``source``), in sorted order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r.get(key, "")), []).append(r)
    return {g: totals(rs) for g, rs in sorted(groups.items())}
