"""Statistics for comparing systems on the same test set: a paired bootstrap of the WER difference and Spearman's
rank correlation. numpy only."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

_CHUNK_CELLS = 4_000_000  # resample indices drawn per chunk (resamples x utterances), to bound memory


def _edit_arrays(records: Sequence[dict[str, Any]], order: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-utterance word errors (S + D + I) and reference word counts, in the order of ``order`` (ids)."""
    by_id = {str(r["id"]): r["words"] for r in records}
    w = [by_id[i] for i in order]
    errors = np.array([x["substitutions"] + x["deletions"] + x["insertions"] for x in w], dtype=np.float64)
    ref = np.array([x["ref"] for x in w], dtype=np.float64)
    return errors, ref


def _ids(records: Sequence[dict[str, Any]], which: str) -> list[str]:
    ids = [str(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        dups = sorted(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"{which} records repeat utterance ids: {_show(dups)}")
    return ids


def _show(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" (and {len(ids) - n} more)" if len(ids) > n else "")


def _wer(errors: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Corpus WER = sum(errors) / sum(ref words) along the last axis (errors > 0 over no words counts as 1)."""
    e, n = errors.sum(axis=-1), ref.sum(axis=-1)
    return np.where(n > 0, e / np.maximum(n, 1), (e > 0).astype(np.float64))


def paired_bootstrap(base: list[dict], variant: list[dict], n_resamples: int = 1000, seed: int = 0) -> dict:
    """ΔWER = WER(variant) − WER(base) on the same utterances (matched by ``id``), with a 95 % percentile CI from
    a paired bootstrap over utterances (Bisani & Ney 2004) and ``p_improve``, the fraction of resamples in which
    the variant's WER is strictly lower than the base's. Rates are fractions, not percentages."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    base_ids, var_ids = _ids(base, "base"), _ids(variant, "variant")
    if set(base_ids) != set(var_ids):
        only_b = sorted(set(base_ids) - set(var_ids))
        only_v = sorted(set(var_ids) - set(base_ids))
        parts = [f"only in base: {_show(only_b)}" if only_b else "",
                 f"only in variant: {_show(only_v)}" if only_v else ""]
        raise ValueError("base and variant cover different utterances; " + "; ".join(p for p in parts if p))
    if not base_ids:
        raise ValueError("no utterances to compare")
    eb, rb = _edit_arrays(base, base_ids)
    ev, rv = _edit_arrays(variant, base_ids)
    delta = float(_wer(ev, rv) - _wer(eb, rb))

    n = len(base_ids)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples, dtype=np.float64)
    step = max(1, _CHUNK_CELLS // n)
    for start in range(0, n_resamples, step):
        stop = min(start + step, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        diffs[start:stop] = _wer(ev[idx], rv[idx]) - _wer(eb[idx], rb[idx])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"delta_wer": delta, "ci_low": float(lo), "ci_high": float(hi),
            "p_improve": float(np.mean(diffs < 0)), "n_resamples": int(n_resamples), "seed": seed}


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(len(a), dtype=np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson correlation of average ranks, so ties are handled); ``None`` with
    fewer than 3 pairs or when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs pairs: got {len(x)} x values and {len(y)} y values")
    if len(x) < 3:
        return None
    rx = _average_ranks(np.asarray(x, dtype=np.float64))
    ry = _average_ranks(np.asarray(y, dtype=np.float64))
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((dx * dx).sum() * (dy * dy).sum()))
    if denom == 0.0:
        return None
    return float((dx * dy).sum() / denom)
