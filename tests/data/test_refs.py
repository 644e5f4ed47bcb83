"""Reference parsing and the errors a malformed or unknown reference gives."""

from __future__ import annotations

import pytest

from mla_registry.data import describe, load, parse
from mla_registry.errors import DataError


def test_parse_kinds(tmp_path):
    (tmp_path / "set.csv").write_text("file_name,transcription\n")
    assert parse("builtin:real").kind == "builtin"
    r = parse("builtin:tts-test?size=6&seed=2")
    assert (r.kind, r.target, r.params) == ("builtin", "tts-test", {"size": "6", "seed": "2"})
    r = parse("hf:openslr/librispeech_asr?config=clean&split=test")
    assert (r.kind, r.target, r.params) == ("hf", "openslr/librispeech_asr", {"config": "clean", "split": "test"})
    assert parse(str(tmp_path)).kind == "audiofolder"
    assert parse(str(tmp_path / "set.csv")).kind == "csv"


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [
        ("builtin:nope", "unknown builtin data set 'nope'"),
        ("builtin:", "nothing after"),
        ("hf:", "nothing after"),
        ("builtin:tts-test?size=abc", "size and seed must be integers"),
        ("builtin:tts-test?size=0", "size must be at least 1"),
        ("builtin:tts-test?bogus=1", "unknown option 'bogus'"),
        ("builtin:tts-test?size", "malformed query"),
        ("builtin:tts-test?size=4&size=5", "given twice"),
        ("builtin:real?source=nowhere", "unknown source 'nowhere'"),
        ("builtin:real?size=3", "unknown option 'size'"),
        ("/no/such/dir/anywhere", "is not understood"),
        ("/no/such/file.csv", "does not exist"),
        ("", "empty data reference"),
    ],
)
def test_bad_refs(ref, fragment):
    with pytest.raises(DataError, match=fragment.replace("?", r"\?")):
        load(ref)
    with pytest.raises(DataError):
        describe(ref)


def test_non_csv_file_is_rejected(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("hi")
    with pytest.raises(DataError, match="not a .csv"):
        load(str(p))


def test_bad_limit():
    with pytest.raises(DataError, match="limit"):
        load("builtin:real", limit=-1)


def test_hf_missing_dataset_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="load_dataset"):
        load(f"hf:{tmp_path}?split=test", quiet=True)
