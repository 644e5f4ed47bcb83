"""The ``gqa`` plugin: mean-pooled K/V heads, a cache of ``kv_heads`` heads, exact MHA at full heads."""

from __future__ import annotations

import pytest
import torch

from mla_registry.errors import KwargError
from mla_registry.families import whisper
from mla_registry.plugins.gqa import GqaBuilder, GroupedQueryAttention


def test_kv_heads_equal_heads_is_mha(stock, fresh, features, decoder_ids, h):
    model = h.swap(fresh(), GqaBuilder(), kv_heads=h.HEADS)
    torch.testing.assert_close(h.logits(model, features, decoder_ids), h.logits(stock, features, decoder_ids),
                               atol=1e-5, rtol=0)
    assert torch.equal(h.greedy(model, features), h.greedy(stock, features))


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_equals_mha_with_repeated_heads(fresh, features, decoder_ids, h, kv_heads):
    """GQA (cache of kv_heads heads, SDPA enable_gqa) computes what a stock MHA computes with every pooled K/V
    head repeated over its group: same logits, same greedy and beam-search tokens."""
    model = h.swap(fresh(), GqaBuilder(), kv_heads=kv_heads)
    reference = fresh()
    for slot in whisper.slots(model):
        new, old = model.get_submodule(slot.path), reference.get_submodule(slot.path)
        assert isinstance(new, GroupedQueryAttention)
        assert new.k_proj.weight.shape == (kv_heads * new.head_dim, h.D_MODEL)
        rep = h.HEADS // kv_heads
        with torch.no_grad():
            for name in ("k_proj.weight", "v_proj.weight", "v_proj.bias"):
                pooled = new.get_parameter(name).view(kv_heads, new.head_dim, -1)
                target = old.get_parameter(name)
                target.copy_(pooled.repeat_interleave(rep, dim=0).reshape_as(target))
    torch.testing.assert_close(h.logits(model, features, decoder_ids),
                               h.logits(reference, features, decoder_ids), atol=1e-5, rtol=1e-5)
    assert torch.equal(h.greedy(model, features), h.greedy(reference, features))
    assert torch.equal(h.greedy(model, features, num_beams=3), h.greedy(reference, features, num_beams=3))


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_causal_in_training_without_mask(fresh, features, decoder_ids, h, kv_heads):
    h.assert_causal(h.swap(fresh(), GqaBuilder(), kv_heads=kv_heads), features, decoder_ids)


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
def test_cache_bytes_measured(fresh, features, h, kv_heads):
    model = h.swap(fresh(), GqaBuilder(), kv_heads=kv_heads)
    for which in ("self", "cross"):
        measured, claimed = h.cache_bytes(model, features, which)
        assert measured == claimed == 2 * (2 * kv_heads * 16 * 4)  # 2 layers, K+V, kv_heads x head_dim, fp32


def test_build_and_strict_load_roundtrip(fresh, features, decoder_ids, h):
    model = h.swap(fresh(), GqaBuilder(), kv_heads=2)
    h.assert_roundtrip(GqaBuilder(), model, features, decoder_ids, kv_heads=2)


def test_backward(fresh, features, decoder_ids, h):
    model = h.swap(fresh(), GqaBuilder(), kv_heads=2)
    h.assert_backward(model, features, decoder_ids, ("k_proj.weight", "v_proj.weight", "v_proj.bias"))


def test_bf16_forward(fresh, features, decoder_ids, h):
    model = h.swap(fresh(), GqaBuilder(), kv_heads=1).to(torch.bfloat16)
    out = h.logits(model, features.to(torch.bfloat16), decoder_ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    h.greedy(model, features.to(torch.bfloat16))


def test_kwarg_errors(stock):
    builder = GqaBuilder()
    slot = whisper.slots(stock)[0]
    with pytest.raises(KwargError, match="kv_heads.*required"):
        builder.validate({})
    with pytest.raises(KwargError, match="kv_heads"):
        builder.validate({"kv_heads": 0})
    with pytest.raises(KwargError, match=r"kv_heads'=3.*allowed values: 1, 2, 4"):
        builder.check_slot(slot, builder.validate({"kv_heads": "3"}))
