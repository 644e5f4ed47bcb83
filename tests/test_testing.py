"""The conformance kit catches what it promises to catch: each check fails on a plugin broken in that way."""

from __future__ import annotations

import pytest
import torch

from mla_registry import testing
from mla_registry.plugins.gqa import GqaBuilder, GroupedQueryAttention


class LeakyAttention(GroupedQueryAttention):
    """Ignores causality: every decoder position sees the future."""

    def attention(self, hidden_states, key_value_states, cache, attention_mask, output_attentions):
        self.is_causal = False
        return super().attention(hidden_states, key_value_states, cache, attention_mask, output_attentions)


class LyingAttention(GroupedQueryAttention):
    """Declares half the cache it holds."""

    def kv_cache_bytes_per_token(self) -> int:
        return super().kv_cache_bytes_per_token() // 2


class CachelessAttention(GroupedQueryAttention):
    """Drops the host's cache: decoding attends to the newest token only."""

    def attention(self, hidden_states, key_value_states, cache, attention_mask, output_attentions):
        return super().attention(hidden_states, key_value_states, None, attention_mask, output_attentions)


def builder_of(module_cls, name):
    class Builder(GqaBuilder):
        def build(self, slot, **kwargs):
            return module_cls(slot, kwargs["kv_heads"])

    b = Builder()
    b.name = name
    return b


def test_a_correct_plugin_passes():
    results = testing.check_plugin(GqaBuilder(), [{"kv_heads": 2}], checks=("causal", "cache", "equivalences"))
    assert set(results.values()) == {"ok"}


@pytest.mark.parametrize("module_cls,check,message", [
    (LeakyAttention, "causal", "the future leaks into the past"),
    (LyingAttention, "cache", "modules declare"),
    (CachelessAttention, "equivalences", "kv_heads = num_heads reproduces the original"),
])
def test_each_check_catches_its_breakage(module_cls, check, message):
    with pytest.raises(AssertionError, match=message):
        testing.check_plugin(builder_of(module_cls, "broken"), [{"kv_heads": 2}], checks=(check,))


def test_tiny_whisper_is_deterministic_and_varied():
    a, b = testing.tiny_whisper(vocab=128, frames=50, init_std=0.3), testing.tiny_whisper(vocab=128, frames=50,
                                                                                          init_std=0.3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    feats = testing.random_features(a)
    with torch.no_grad():
        tokens = a.generate(feats, max_new_tokens=8)
    assert len(set(tokens.flatten().tolist())) > 3
