"""builtin:real: the 57 bundled recordings, decoded to float32 mono 16 kHz."""

from __future__ import annotations

import numpy as np
import pytest

from mla_registry.data import SAMPLE_RATE, describe, fingerprint_of, load


@pytest.fixture(scope="module")
def real():
    return load("builtin:real", quiet=True)


def test_all_57_recordings(real):
    assert len(real) == 57
    assert len({u.id for u in real}) == 57
    assert {u.source for u in real} == {
        "cmu_arctic_samples", "jfk", "librispeech_dev_clean", "librispeech_test_clean", "ljspeech",
    }
    for u in real:
        assert u.audio.dtype == np.float32 and u.audio.ndim == 1
        assert 0.5 < u.duration < 35
        assert 1e-3 < np.abs(u.audio).max() <= 1.0
        assert u.text.strip() and u.voice.startswith("real:")
    by_id = {u.id: u for u in real}
    assert by_id["librispeech_test_clean/1089-134686-0000"].voice == "real:1089"
    assert by_id["cmu_arctic_samples/cmu_arctic_us_aew_a0001"].voice == "real:aew"


def test_jfk_stereo_44k_is_resampled(real):
    """jfk.flac is 44.1 kHz stereo, 11.0 s: 16 kHz mono gives 176000 samples."""
    (jfk,) = [u for u in real if u.source == "jfk"]
    assert jfk.audio.ndim == 1
    assert abs(len(jfk.audio) / SAMPLE_RATE - 11.0) < 0.05
    assert jfk.text.startswith("And so my fellow Americans")


def test_ljspeech_22k_durations(real):
    import soundfile as sf

    from mla_registry.data.builtin import REAL_DIR

    u = next(u for u in real if u.id == "ljspeech/LJ001-0001")
    info = sf.info(REAL_DIR / "ljspeech" / "LJ001-0001.flac")
    assert info.samplerate == 22050
    assert abs(u.duration - info.duration) < 0.01


def test_source_filter_and_limit():
    lj = load("builtin:real?source=ljspeech", quiet=True)
    assert len(lj) == 32 and {u.source for u in lj} == {"ljspeech"}
    two = load("builtin:real?source=jfk,librispeech_test_clean", quiet=True)
    assert [u.source for u in two] == ["jfk"] + ["librispeech_test_clean"] * 4
    assert len(load("builtin:real", limit=3, quiet=True)) == 3


def test_describe_matches_load(real):
    d = describe("builtin:real")
    assert d["kind"] == "builtin:real" and d["size"] == 57 and d["seed"] is None
    assert d["fingerprint"] == fingerprint_of(real)
    assert describe("builtin:real?source=jfk")["size"] == 1
