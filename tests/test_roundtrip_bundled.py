"""The point of the project, on the real model and real speech: every built-in variant, saved and then rebuilt
by load() in a fresh Python process, transcribes token-identically to the model that was saved, and holds
exactly the KV cache its plugin states."""

import json
import subprocess
import sys

import pytest
import torch

from mla_registry import checkpoint, data, kvcache, model_refs, whisper
from mla_registry.calibration import CalibrationSettings
from mla_registry.convert import convert_model

CALIBRATION = CalibrationSettings("builtin:real?source=librispeech_dev_clean", 4)  # not the test clips
VARIANTS = {  # name -> attention specs (decoder self + cross for each built-in)
    "mha": ["decoder.*=mha"],
    "gqa-2": ["decoder.*=gqa:kv_heads=2"],
    "mla-192": ["decoder.*=mla:rank=192"],
    "mla-96-svd": ["decoder.*=mla:rank=96,init=svd"],
}

FRESH = r"""
import json, sys, torch
from mla_registry import checkpoint, data, model_refs
from mla_registry import whisper
utts = data.load("builtin:real?source=librispeech_test_clean", limit=2, quiet=True)
result = {}
for path in sys.argv[1:]:
    model = checkpoint.load(path)
    feats = whisper.input_features(model_refs.load_processor(path), [u.audio for u in utts])
    with torch.no_grad():
        result[path] = model.generate(feats, max_new_tokens=60).tolist()
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def base():
    return model_refs.load("bundled:whisper-tiny.en")


@pytest.fixture(scope="module")
def clips(base):
    utts = data.load("builtin:real?source=librispeech_test_clean", limit=2, quiet=True)
    return utts, whisper.input_features(base[1], [u.audio for u in utts])


def generate(model, feats, **kw):
    with torch.no_grad():
        return model.generate(feats, max_new_tokens=60, **kw)


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory, clips):
    """Convert and save every variant, then reload all of them in one fresh Python process."""
    root = tmp_path_factory.mktemp("variants")
    expected = {}
    for name, specs in VARIANTS.items():
        model, processor = model_refs.load("bundled:whisper-tiny.en")
        convert_model(model, processor, specs, CALIBRATION)
        expected[str(root / name)] = generate(model, clips[1]).tolist()
        checkpoint.save(model, root / name, processor)
    proc = subprocess.run([sys.executable, "-c", FRESH, *expected], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, expected, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reloaded_in_fresh_process_is_token_identical(reloaded, name):
    root, expected, got = reloaded
    key = str(root / name)
    assert got[key] == expected[key]
    manifest = checkpoint.read_manifest(key)
    assert all(r["plugin"] == VARIANTS[name][0].split("=")[1].split(":")[0] for r in manifest["slots"])
    assert len(manifest["slots"]) == 8  # 4 decoder layers x (self + cross)


def test_mha_plugin_equals_stock_on_real_speech(base, clips):
    stock = base[0]
    model, processor = model_refs.load("bundled:whisper-tiny.en")
    convert_model(model, processor, ["*=mha"])
    for kw in ({}, {"num_beams": 3}):
        assert torch.equal(generate(model, clips[1], **kw), generate(stock, clips[1], **kw))
    ids = torch.tensor([[50257, 50362, 679, 10719, 612, 561, 307]])
    with torch.no_grad():
        a = stock(input_features=clips[1][:1], decoder_input_ids=ids).logits
        b = model(input_features=clips[1][:1], decoder_input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_measured_cache_equals_declared_and_shrinks_as_stated(clips):
    """The cache generate() really holds, per variant: equal to what the modules declare, and in the ratios the
    conversions promise against the stock model's (measured, not computed from the same literals)."""
    held = {}
    for name in ("stock", "gqa-2", "mla-96-svd"):
        model, processor = model_refs.load("bundled:whisper-tiny.en")
        if name != "stock":
            convert_model(model, processor, VARIANTS[name])
        with torch.no_grad():
            out = model.generate(clips[1], max_new_tokens=20, return_dict_in_generate=True)
        held[name] = kvcache.measure(out.past_key_values)
        declared_self, declared_cross = kvcache.declared(model)
        assert held[name].self_per_token == declared_self
        assert held[name].cross_per_frame == declared_cross
        assert held[name].cross_per_utterance == declared_cross * 1500  # every encoder frame, once
    stock, d = held["stock"], 384
    assert stock.self_per_token == 4 * 2 * d * 4  # 4 layers, K and V of d_model each, fp32: WhisperAttention's
    for name, fraction in (("gqa-2", 2 / 6), ("mla-96-svd", 96 / (2 * d))):
        assert held[name].self_per_token == pytest.approx(stock.self_per_token * fraction)
        assert held[name].cross_per_utterance == pytest.approx(stock.cross_per_utterance * fraction)
        assert held[name].self_per_utterance < stock.self_per_utterance
