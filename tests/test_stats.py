import numpy as np
import pytest

from mla_registry.stats import paired_bootstrap, spearman


def _records(errors, refs, prefix="u"):
    return [{"id": f"{prefix}{i}", "words": {"hits": r - e if r >= e else 0, "substitutions": e, "deletions": 0,
                                             "insertions": 0, "ref": r}}
            for i, (e, r) in enumerate(zip(errors, refs))]


def test_identical_systems_have_zero_delta_and_degenerate_ci():
    rng = np.random.default_rng(1)
    refs = rng.integers(5, 20, size=40)
    recs = _records(rng.integers(0, 4, size=40), refs)
    b = paired_bootstrap(recs, [dict(r) for r in reversed(recs)], n_resamples=500)  # order does not matter
    assert b["delta_wer"] == 0 and b["ci_low"] == 0 and b["ci_high"] == 0
    assert b["p_improve"] == 0
    assert b["n_resamples"] == 500 and b["seed"] == 0


def test_clearly_better_variant():
    rng = np.random.default_rng(2)
    refs = rng.integers(8, 20, size=100)
    base = _records(rng.integers(2, 6, size=100), refs)
    better = _records(rng.integers(0, 2, size=100), refs)
    b = paired_bootstrap(base, better)
    wer = lambda rs: sum(r["words"]["substitutions"] for r in rs) / sum(r["words"]["ref"] for r in rs)
    assert b["delta_wer"] == pytest.approx(wer(better) - wer(base))
    assert b["ci_low"] <= b["delta_wer"] <= b["ci_high"] < 0
    assert b["p_improve"] > 0.99
    worse = paired_bootstrap(better, base)
    assert worse["ci_low"] > 0 and worse["p_improve"] < 0.01


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(3)
    refs = rng.integers(5, 15, size=30)
    a, b = _records(rng.integers(0, 5, size=30), refs), _records(rng.integers(0, 5, size=30), refs)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    key = lambda r: (r["ci_low"], r["ci_high"], r["p_improve"])
    assert key(paired_bootstrap(a, b, seed=7)) != key(paired_bootstrap(a, b, seed=8))


def test_chunked_resampling_matches_shape(monkeypatch):
    from mla_registry import stats

    rng = np.random.default_rng(4)
    refs = rng.integers(5, 15, size=50)
    a, b = _records(rng.integers(0, 5, size=50), refs), _records(rng.integers(0, 5, size=50), refs)
    monkeypatch.setattr(stats, "_CHUNK_CELLS", 50 * 7)  # 7 resamples per chunk, 1000 not a multiple of it
    small = paired_bootstrap(a, b)
    assert small["ci_low"] <= small["delta_wer"] <= small["ci_high"]


def test_mismatched_ids_are_named():
    a = _records([1, 2, 3], [5, 5, 5])
    b = _records([1, 2, 3], [5, 5, 5])
    b[2]["id"] = "extra"
    with pytest.raises(ValueError, match=r"only in base: u2.*only in variant: extra"):
        paired_bootstrap(a, b)
    with pytest.raises(ValueError, match="repeat utterance ids: u0"):
        paired_bootstrap(a + a[:1], b)
    with pytest.raises(ValueError, match="no utterances"):
        paired_bootstrap([], [])


def test_spearman_hand_computed():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties in y: ranks (1, 2, 3.5, 5, 3.5); Pearson of ranks = 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / np.sqrt(95))
    # ties on both sides: x ranks (1.5, 1.5, 3), y ranks (1, 2.5, 2.5): 0.75 / sqrt(1.5 * 1.5) = 0.5
    assert spearman([0.1, 0.1, 0.3], [2, 5, 5]) == pytest.approx(0.5)


def test_spearman_undefined():
    assert spearman([1, 2], [2, 1]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, 2, 3], [4, 4, 4]) is None
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2])
