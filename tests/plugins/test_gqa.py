"""The ``gqa`` plugin: mean-pooled K/V heads, a cache of ``kv_heads`` heads, folded attention equal to MHA with
the pooled heads repeated (the generic contract is in test_conformance)."""

from __future__ import annotations

import pytest
import torch

from mla_registry import whisper
from mla_registry.errors import KwargError
from mla_registry.plugins.gqa import GqaBuilder, GroupedQueryAttention
from mla_registry.plugins.mha import MhaBuilder


def forced(model, features, steps: int = 10) -> torch.Tensor:
    """Greedy tokens with a forced length (end-of-text suppressed), as bench/decode.py decodes."""
    with torch.no_grad():
        return model.generate(features, min_new_tokens=steps, max_new_tokens=steps)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_equals_mha_with_repeated_heads(fresh, features, decoder_ids, h, kv_heads):
    """GQA (a cache of kv_heads heads, queries folded onto them) computes what MHA computes with every pooled
    K/V head repeated over its group: same logits, same greedy, forced-length and beam-search tokens."""
    model = h.swap(fresh(), GqaBuilder(), kv_heads=kv_heads)
    reference = h.swap(fresh(), MhaBuilder())
    for slot in whisper.slots(model):
        gqa, mha = model.get_submodule(slot.path), reference.get_submodule(slot.path)
        assert isinstance(gqa, GroupedQueryAttention)
        assert gqa.k_proj.weight.shape == (kv_heads * gqa.head_dim, h.D_MODEL)
        rep = gqa.num_key_value_groups
        with torch.no_grad():
            for name in ("k_proj", "v_proj"):
                src, dst = getattr(gqa, name), getattr(mha, name)
                w = src.weight.view(gqa.kv_heads, 1, gqa.head_dim, -1).expand(-1, rep, -1, -1)
                dst.weight.copy_(w.reshape_as(dst.weight))
                if src.bias is not None:
                    dst.bias.copy_(src.bias.view(gqa.kv_heads, 1, -1).expand(-1, rep, -1).reshape(-1))
    for kw in ({}, {"use_cache": True}):
        torch.testing.assert_close(h.logits(model, features, decoder_ids, **kw),
                                   h.logits(reference, features, decoder_ids, **kw), atol=5e-5, rtol=1e-5)
    assert torch.equal(h.greedy(model, features), h.greedy(reference, features))
    assert torch.equal(forced(model, features), forced(reference, features))
    assert torch.equal(h.greedy(model, features, num_beams=3), h.greedy(reference, features, num_beams=3))


def test_heads_are_mean_pooled(stock, fresh, h):
    model = h.swap(fresh(), GqaBuilder(), kv_heads=2)
    orig = stock.model.decoder.layers[1].self_attn
    new = model.model.decoder.layers[1].self_attn
    hd = orig.head_dim
    expect = (orig.k_proj.weight[0:hd] + orig.k_proj.weight[hd:2 * hd]) / 2
    torch.testing.assert_close(new.k_proj.weight[0:hd], expect)
    expect_b = (orig.v_proj.bias[2 * hd:3 * hd] + orig.v_proj.bias[3 * hd:4 * hd]) / 2
    torch.testing.assert_close(new.v_proj.bias[hd:2 * hd], expect_b)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_declared_cache_is_kv_heads_heads(fresh, h, kv_heads):
    model = h.swap(fresh(), GqaBuilder(), kv_heads=kv_heads)
    assert model.model.decoder.layers[0].encoder_attn.kv_cache_bytes_per_token() == 2 * kv_heads * 16 * 4


def test_kwarg_errors(stock):
    builder = GqaBuilder()
    slot = whisper.slots(stock)[0]
    with pytest.raises(KwargError, match="kv_heads.*required"):
        builder.validate({})
    with pytest.raises(KwargError, match="kv_heads"):
        builder.validate({"kv_heads": 0})
    with pytest.raises(KwargError, match=r"kv_heads'=3.*allowed values: 1, 2, 4"):
        builder.check_slot(slot, builder.validate({"kv_heads": "3"}))
