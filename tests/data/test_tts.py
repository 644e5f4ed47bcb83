"""builtin:tts-*: deterministic plans, disjoint splits, no real transcript voiced, cached audiofolder builds."""

from __future__ import annotations

import numpy as np
import pytest

from mla_registry.data import describe, fingerprint_of, load, text, tts
from mla_registry.data.builtin import real_texts
from mla_registry.errors import DataError

TINY = "builtin:tts-test?size=6&seed=1"


def test_plans_are_deterministic_and_prefix_stable():
    real = real_texts()
    a = tts.plan("test", 40, 0, real)
    assert a == tts.plan("test", 40, 0, real)
    assert tts.plan("test", 10, 0, real) == a[:10]
    assert [i.text for i in tts.plan("test", 40, 1, real)] != [i.text for i in a]
    assert len({i.id for i in a}) == 40
    # every block of 8 holds the whole voice mix; the five corpora take turns
    counts = {v.name: sum(i.voice == v.name for i in a[:32]) for v in tts.VOICE_MIX}
    assert counts == {v.name: 4 * v.weight for v in tts.VOICE_MIX}
    assert {i.source for i in a[:5]} == {f"tts:{c}" for c in text.CORPORA}


def test_default_splits_disjoint_and_free_of_real_transcripts():
    real = real_texts()
    assert len(real) == 57
    hit = text.excluded_by(real)
    seen: dict[str, str] = {}
    for split, size in tts.SPLITS.items():
        items = tts.plan(split, size, tts.DEFAULT_SEED, real)
        assert len(items) == size
        for it in items:
            key = text.normalise(it.text)
            assert seen.setdefault(key, split) == split, f"{it.text!r} is in {seen[key]} and {split}"
            assert not hit(it.text), it.text
            assert 5 <= len(it.text.split()) <= 30
            assert not any(ch.isdigit() for ch in it.text)
    # the whole pools too, not just the default sets
    pools = {s: {text.normalise(x.text) for c in text.sentence_pool(s, real).values() for x in c}
             for s in tts.SPLITS}
    assert not (pools["test"] & pools["valid"] or pools["test"] & pools["train"] or pools["valid"] & pools["train"])
    assert not any(text.normalise(t) in pools[s] for t in real for s in pools)


def test_overlap_rule_catches_fragments_of_real_transcripts():
    hit = text.excluded_by(["And so my fellow Americans, ask not what your country can do for you."])
    assert hit("AND SO MY FELLOW AMERICANS ASK NOT WHAT YOUR COUNTRY CAN DO FOR YOU")
    assert hit("So my fellow Americans.")  # contained
    assert hit("Then ask not what your country can do, he said.")  # shares six words
    assert not hit("The birch canoe slid on the smooth planks.")


def test_tiny_set_builds_once_and_is_deterministic(data_cache, monkeypatch, tmp_path):
    assert describe(TINY)["built"] is False
    first = load(TINY, quiet=True)
    assert len(first) == 6
    names = {v.name for v in tts.VOICE_MIX}
    for u in first:
        assert u.voice in names and u.source.startswith("tts:")
        assert u.audio.dtype == np.float32 and u.audio.ndim == 1 and 0.5 < u.duration < 20
        assert np.abs(u.audio).max() > 0.01
    assert {u.voice.split(":")[0].split("@")[0] for u in first} == {"hibari", "espeak"}
    d = describe(TINY)
    assert d["built"] is True and d["size"] == 6 and d["seed"] == 1 and d["fingerprint"] == fingerprint_of(first)
    assert d["espeak_ng"].startswith("espeak-ng") and d["hibari"]
    built = tts.set_dir("test", 6, 1)
    assert sorted(p.name for p in built.iterdir() if p.suffix == ".wav") == sorted(f"{u.id}.wav" for u in first)
    assert (built / "metadata.csv").read_text().splitlines()[0] == "file_name,transcription,voice,source"

    def no_rebuild(*a, **k):
        raise AssertionError("the cached set should have been reused")

    monkeypatch.setattr(tts, "build", no_rebuild)
    second = load(TINY, quiet=True)
    assert [(u.id, u.text, u.voice) for u in second] == [(u.id, u.text, u.voice) for u in first]
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(first, second))
    assert len(load(TINY, limit=2, quiet=True)) == 2
    monkeypatch.undo()

    # a fresh cache synthesises the same audio again (hibari is seeded, espeak-ng is deterministic)
    monkeypatch.setenv("MLA_REGISTRY_CACHE", str(tmp_path / "other-cache"))
    again = load(TINY, quiet=True)
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(first, again))


def test_missing_espeak_is_a_clear_error(data_cache, monkeypatch):
    monkeypatch.setattr(tts.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get install espeak-ng"):
        load("builtin:tts-valid?size=3&seed=9", quiet=True)
    assert not tts.set_dir("valid", 3, 9).exists()  # nothing half-built left behind


def test_a_limit_without_a_size_synthesises_only_what_is_asked(data_cache):
    """Calibration asks for N utterances of builtin:tts-train: N are built (the first N of the 600-set, which
    a smaller set always is), not all 600."""
    utts = load("builtin:tts-valid?seed=3", limit=3, quiet=True)
    assert len(utts) == 3
    built = sorted(p.name for p in (data_cache / "data").iterdir() if p.name.startswith("tts-valid"))
    assert built == [tts.set_dir("valid", 3, 3).name]
    full = tts.plan("valid", tts.SPLITS["valid"], 3, real_texts())
    assert [(u.id, u.text) for u in utts] == [(i.id, i.text) for i in full[:3]]
