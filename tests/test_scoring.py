import pytest

from mla_registry import scoring


def test_utterance_counts_after_normalisation():
    r = scoring.score_utterance("The colour is RED.", "the color is read")
    assert r["reference_norm"] == "the color is red"
    assert r["words"] == {"hits": 3, "substitutions": 1, "deletions": 0, "insertions": 0, "ref": 4}


def test_totals_are_summed_edits_not_mean_rates():
    recs = [scoring.score_utterance("a b c d", "a b c d"), scoring.score_utterance("x", "y z")]
    t = scoring.totals(recs)
    # 1 substitution + 1 insertion over 5 reference words
    assert t["errors"] == 2 and t["ref_words"] == 5
    assert t["wer"] == pytest.approx(2 / 5)
    assert t["substitutions"] == 1 and t["insertions"] == 1 and t["deletions"] == 0


def test_empty_reference_counts_insertions():
    r = scoring.score_utterance("", "hello there")
    assert r["words"]["insertions"] == 2 and r["words"]["ref"] == 0


def test_by_group():
    recs = [dict(scoring.score_utterance("a b", "a b"), voice="v1"),
            dict(scoring.score_utterance("a b", "a"), voice="v2")]
    g = scoring.by_group(recs, "voice")
    assert g["v1"]["wer"] == 0 and g["v2"]["wer"] == 0.5 and g["v2"]["deletions"] == 1
