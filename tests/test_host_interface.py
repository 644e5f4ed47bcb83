"""The host model's attention interface: every built-in plugin decodes correctly on the installed transformers.

transformers 5.24 renamed the cache argument of Whisper's attention modules (``past_key_values=`` ->
``cache=``); modules that took it through ``**kwargs`` silently decoded without a cache and produced wrong tokens
with no error. The first test would have caught that: with the cache, ``generate()`` must give the tokens it
gives without one (and, for ``mha``, the stock model's), on real speech.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from mla_registry import attention, data, models
from mla_registry.convert import convert_model
from mla_registry.errors import HostInterfaceError
from mla_registry.families import whisper

CALIB = "calibration=builtin:real?source=librispeech_dev_clean,calibration_size=4"
SPECS = {
    "mha": "decoder.*=mha",
    "gqa": "decoder.*=gqa:kv_heads=2",
    "mla": f"decoder.*=mla:rank=192,{CALIB}",
    "mla-expanded": f"decoder.*=mla:rank=192,absorb=false,{CALIB}",
}


@pytest.fixture(scope="module")
def clips():
    model, processor = models.load("bundled:whisper-tiny.en")
    utts = data.load("builtin:real?source=librispeech_test_clean", limit=2, quiet=True)
    return model, processor, whisper.input_features(processor, [u.audio for u in utts])


def generate(model, feats, use_cache):
    with torch.no_grad():
        out = model.generate(feats, max_new_tokens=40, use_cache=use_cache, return_dict_in_generate=True)
    return out.sequences, out


@pytest.mark.parametrize("name", list(SPECS))
def test_cached_generate_equals_uncached(clips, name):
    stock, processor, feats = clips
    model, _ = models.load("bundled:whisper-tiny.en")
    convert_model(model, processor, [SPECS[name]])
    cached, out = generate(model, feats, use_cache=True)
    uncached, _ = generate(model, feats, use_cache=False)
    assert torch.equal(cached, uncached)
    if name != "gqa":  # untrained mean-pooled GQA-2 transcribes real speech badly (issue 10), whatever the cache
        assert cached.shape[1] > 10  # a real transcript, not one token and end-of-text
    # the modules really filled the host's cache (a dropped cache leaves it empty)
    assert out.past_key_values.self_attention_cache.get_seq_length() == cached.shape[1] - 1
    if name == "mha":
        assert torch.equal(cached, generate(stock, feats, use_cache=True)[0])


def test_host_cache_name_is_known_for_the_installed_transformers():
    assert attention.host_cache_kwarg() in attention.CACHE_KWARGS


def test_unknown_host_cache_name_is_refused_at_build_time(monkeypatch):
    from transformers.models.whisper import modeling_whisper

    def forward(self, hidden_states, key_value_states=None, kv_store=None, attention_mask=None, **kwargs):
        raise AssertionError("not called")

    monkeypatch.setattr(modeling_whisper.WhisperAttention, "forward", forward)
    attention.host_cache_kwarg.cache_clear()
    try:
        with pytest.raises(HostInterfaceError, match="none of cache, past_key_values"):
            attention.host_cache_kwarg()
    finally:
        monkeypatch.undo()
        attention.host_cache_kwarg.cache_clear()


def test_a_cache_under_an_unknown_name_is_an_error_not_dropped():
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with pytest.raises(HostInterfaceError, match="kv_store="):
        attention.host_cache(None, None, {"kv_store": cache})
    with pytest.raises(HostInterfaceError, match="two different caches"):
        attention.host_cache(cache, EncoderDecoderCache(DynamicCache(), DynamicCache()), {})
    assert attention.host_cache(None, cache, {}) is cache
    assert attention.host_cache(cache, None, {"output_attentions": False}) is cache
