"""Local audiofolder directories, CSV files and hub-layout parquet datasets (through hf:DIR), plus bad audio."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from mla_registry.data import SAMPLE_RATE, describe, fingerprint_of, load
from mla_registry.errors import DataError

DURATIONS = {"a": 1.0, "b": 1.5, "c": 0.5}


def _check_clips(utts, ids=("a", "b", "c")):
    assert [u.id for u in utts] == list(ids)
    for u in utts:
        assert u.audio.dtype == np.float32 and u.audio.ndim == 1
        assert abs(len(u.audio) / SAMPLE_RATE - DURATIONS[u.id[-1]]) < 0.01
        assert 0.2 < np.abs(u.audio).max() < 0.4


def test_audiofolder(wav_dir, data_cache):
    (wav_dir / "metadata.csv").write_text(
        "file_name,transcription,voice,source\n"
        "a.wav,first clip,alice,mine\nb.wav,second clip,bob,mine\nc.flac,third clip,,\n"
    )
    utts = load(str(wav_dir), quiet=True)
    _check_clips(utts)
    assert [u.text for u in utts] == ["first clip", "second clip", "third clip"]
    assert [u.voice for u in utts] == ["alice", "bob", "unknown"]
    assert [u.source for u in utts] == ["mine", "mine", "clips"]
    d = describe(str(wav_dir))
    assert d["kind"] == "audiofolder" and d["size"] == 3 and d["fingerprint"] == fingerprint_of(utts)
    assert len(load(str(wav_dir), limit=2, quiet=True)) == 2


def test_audiofolder_metadata_errors(wav_dir, data_cache):
    with pytest.raises(DataError, match="no metadata.csv"):
        load(str(wav_dir))
    (wav_dir / "metadata.csv").write_text("file_name,text_typo\na.wav,hello\n")
    with pytest.raises(DataError, match=r"metadata.csv has no 'transcription' column"):
        load(str(wav_dir))


def test_csv_with_relative_paths(wav_dir, tmp_path, data_cache):
    csv_path = tmp_path / "lists" / "set.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(
        "file_name,transcription,voice\n../clips/a.wav,one,v1\n../clips/b.wav,two,v2\n../clips/c.flac,three,v3\n"
    )
    utts = load(str(csv_path), quiet=True)
    _check_clips(utts, ids=("../clips/a", "../clips/b", "../clips/c"))
    assert [u.voice for u in utts] == ["v1", "v2", "v3"] and {u.source for u in utts} == {"set"}
    d = describe(str(csv_path))
    assert d["kind"] == "csv" and d["size"] == 3 and d["fingerprint"] == fingerprint_of(utts)


def test_csv_errors(tmp_path, wav_dir):
    p = tmp_path / "bad.csv"
    p.write_text("path,transcription\na.wav,x\n")
    with pytest.raises(DataError, match=r"bad.csv has no 'file_name' column"):
        load(str(p))
    p.write_text("file_name,transcription\nmissing.wav,x\n")
    with pytest.raises(DataError, match=r"missing.wav .*cannot be decoded"):
        load(str(p), quiet=True)


def _hub_dataset(wav_dir, root, split="test", text_col="sentence"):
    """Write a real hub layout: parquet shard with the audio bytes embedded, under root/data/."""
    from datasets import Audio, Dataset
    from datasets.table import embed_table_storage

    ds = Dataset.from_dict({
        "id": ["utt-a", "utt-b", "utt-c"],
        "audio": [str(wav_dir / n) for n in ("a.wav", "b.wav", "c.flac")],
        text_col: ["alpha", "beta", "gamma"],
    }).cast_column("audio", Audio())
    ds = ds.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
    (root / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_hf_hub_layout_directory(wav_dir, tmp_path, data_cache):
    hub = _hub_dataset(wav_dir, tmp_path / "hub")
    shutil.rmtree(wav_dir)  # the audio must come from the parquet bytes, not the original files
    utts = load(f"hf:{hub}?split=test", quiet=True)
    assert [u.id for u in utts] == ["utt-a", "utt-b", "utt-c"]
    assert [u.text for u in utts] == ["alpha", "beta", "gamma"]  # "sentence" column found
    for u, secs in zip(utts, (1.0, 1.5, 0.5)):
        assert u.audio.dtype == np.float32 and abs(u.duration - secs) < 0.01
    assert [u.id for u in load(f"hf:{hub}", quiet=True)] == ["utt-a", "utt-b", "utt-c"]  # only split
    d = describe(f"hf:{hub}?split=test")
    assert d["kind"] == "hf" and d["size"] == 3 and d["fingerprint"] == fingerprint_of(utts)
    with pytest.raises(DataError, match="text column 'nope' not found"):
        load(f"hf:{hub}?split=test&text=nope", quiet=True)
    with pytest.raises(DataError, match="split"):
        load(f"hf:{hub}?split=train", quiet=True)


def test_hf_text_column_option(wav_dir, tmp_path, data_cache):
    hub = _hub_dataset(wav_dir, tmp_path / "hub2", text_col="words")
    with pytest.raises(DataError, match="no text column found"):
        load(f"hf:{hub}?split=test", quiet=True)
    assert [u.text for u in load(f"hf:{hub}?split=test&text=words", quiet=True)] == ["alpha", "beta", "gamma"]


def _write_bad(d, kind):
    if kind == "garbage":
        (d / "bad.wav").write_bytes(os.urandom(4096))
    elif kind == "zero-bytes":
        (d / "bad.wav").write_bytes(b"")
    elif kind == "empty":
        sf.write(d / "bad.wav", np.zeros(0, np.float32), 16000)
    elif kind == "silent":
        sf.write(d / "bad.wav", np.zeros(16000, np.float32), 16000)
    elif kind == "missing":
        pass


@pytest.mark.parametrize("kind", ["garbage", "zero-bytes", "empty", "silent", "missing"])
def test_bad_audio_names_the_file(wav_dir, data_cache, kind):
    _write_bad(wav_dir, kind)
    (wav_dir / "metadata.csv").write_text(
        "file_name,transcription\na.wav,one\nbad.wav,broken\nb.wav,two\nc.flac,three\n"
    )
    with pytest.raises(DataError, match=r"bad\.wav") as err:
        load(str(wav_dir), quiet=True)
    if kind == "silent":
        assert "silent" in str(err.value)
    with pytest.warns(UserWarning, match=r"skipped 1 bad audio file\(s\): .*bad\.wav"):
        utts = load(str(wav_dir), skip_bad=True, quiet=True)
    _check_clips(utts)


def test_skip_bad_counts_several(wav_dir, data_cache, tone):
    sf.write(wav_dir / "quiet.wav", tone(1.0, 16000) * 1e-5, 16000)
    (wav_dir / "junk.wav").write_bytes(b"RIFF....not audio")
    csv_path = wav_dir / "list.csv"
    csv_path.write_text("file_name,transcription\nquiet.wav,x\na.wav,one\njunk.wav,y\nb.wav,two\n")
    with pytest.warns(UserWarning, match=r"skipped 2 bad audio file\(s\): .*quiet\.wav.*junk\.wav"):
        utts = load(str(csv_path), skip_bad=True, quiet=True)
    assert [u.id for u in utts] == ["a", "b"]
    with pytest.warns(UserWarning, match=r"skipped 1 bad"):
        assert len(load(str(csv_path), skip_bad=True, limit=1, quiet=True)) == 1


def test_audiofolder_with_split_folders(tmp_path, data_cache, tone):
    for split in ("train", "test"):
        (tmp_path / "af" / split).mkdir(parents=True)
        sf.write(tmp_path / "af" / split / f"{split}1.wav", tone(1.0, 16000), 16000)
        (tmp_path / "af" / split / "metadata.csv").write_text(f"file_name,transcription\n{split}1.wav,{split} words\n")
    with pytest.raises(DataError, match=r"several splits \(train, test\); load one with hf:.*\?split=NAME"):
        load(str(tmp_path / "af"), quiet=True)
    (u,) = load(f"hf:{tmp_path / 'af'}?split=test", quiet=True)
    assert u.text == "test words" and abs(u.duration - 1.0) < 0.01


def test_a_decoder_that_cannot_load_is_an_install_error_not_a_bad_file(wav_dir, data_cache, monkeypatch):
    """A torchcodec built for another torch fails inside its native loader; that must not read as a bad file."""
    import torchcodec.decoders

    from mla_registry.data import loaders as audio
    from mla_registry.errors import InstallError

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("Could not load libtorchcodec. Likely causes: ... libtorchcodec_core7.so: undefined "
                               "symbol: _ZN3c1013MessageLogger")

    (wav_dir / "metadata.csv").write_text("file_name,transcription\na.wav,first clip\n")
    monkeypatch.setattr(torchcodec.decoders, "AudioDecoder", Broken)
    audio.check_decoder.cache_clear()
    try:
        with pytest.raises(InstallError) as info:
            load(str(wav_dir), quiet=True)
    finally:
        audio.check_decoder.cache_clear()
    message = str(info.value)
    assert "installation problem, not a bad audio file" in message and "torchcodec" in message
    assert "pip install 'torchcodec" in message and "a.wav" not in message


def test_a_lazy_set_reads_each_file_when_asked_and_keeps_none(wav_dir, data_cache, monkeypatch):
    (wav_dir / "metadata.csv").write_text("file_name,transcription\na.wav,first\nb.wav,second\nc.flac,third\n")
    from mla_registry.data import loaders

    decoded = []
    real = loaders.decoded_to_array
    monkeypatch.setattr(loaders, "decoded_to_array", lambda d: decoded.append(1) or real(d))
    utts = load(str(wav_dir), lazy=True, quiet=True)
    assert [u.id for u in utts] == ["a", "b", "c"] and [u.text for u in utts] == ["first", "second", "third"]
    assert decoded == [] and all(u.lazy for u in utts)
    eager = load(str(wav_dir), quiet=True)
    decoded.clear()
    assert np.array_equal(utts[1].audio, eager[1].audio) and len(decoded) == 1
    assert utts[1].duration == pytest.approx(1.5) and len(decoded) == 1  # the duration is remembered
    _ = utts[1].audio
    assert len(decoded) == 2  # not kept: read again


def test_a_bad_file_in_a_lazy_set_is_an_error_naming_it_when_read(wav_dir, data_cache):
    sf.write(wav_dir / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    (wav_dir / "metadata.csv").write_text("file_name,transcription\na.wav,first\nsilent.wav,nothing\n")
    utts = load(str(wav_dir), lazy=True, quiet=True)
    assert len(utts[0].audio) == 16000
    with pytest.raises(DataError, match=r"silent\.wav.*is silent"):
        _ = utts[1].audio
