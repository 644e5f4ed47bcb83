"""The fast decoding paths compute what the plain paths compute: folded grouped/multi-query attention against
repeated K/V, head-batched MLA absorption against re-expanded K/V, on logits and on forced-length tokens."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mla_registry.attention import attend, causal_mask
from mla_registry.families import whisper
from mla_registry.plugins.gqa import GqaBuilder, GroupedQueryAttention
from mla_registry.plugins.mha import MhaBuilder
from mla_registry.plugins.mla import MlaBuilder, MultiHeadLatentAttention


class _Flags(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.is_causal = causal

    def dropout_p(self) -> float:
        return 0.0


def reference(query, key, value, mask, causal, scale):
    """Plain attention: K/V repeated per group, explicit softmax, bottom-right causal mask."""
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scores = query @ key.transpose(-1, -2) * scale
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if mask is None and causal and q_len > 1:
        mask = causal_mask(q_len, kv_len, query.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, -1) @ value


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("case", ["decode", "prefill", "prefix", "bool-mask", "float-mask"])
def test_folded_gqa_attention_matches_repeated_kv(kv_heads, case):
    g = torch.Generator().manual_seed(3)
    batch, heads, dim = 3, 6, 8
    q_len, kv_len = {"decode": (1, 9), "prefill": (5, 5), "prefix": (4, 9)}.get(case, (4, 9))
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, kv_len, 5, generator=g)
    mask = None
    if case == "bool-mask":
        mask = torch.rand(batch, 1, q_len, kv_len, generator=g) > 0.3
        mask[..., 0] = True
    elif case == "float-mask":
        mask = torch.randn(batch, 1, q_len, kv_len, generator=g)
    module = _Flags(causal=case in ("prefill", "prefix", "decode"))
    out, _ = attend(module, q, k, v, mask, scale=0.5)
    expected = reference(q, k, v, mask, module.is_causal, 0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    weights_out, weights = attend(module, q, k, v, mask, scale=0.5, output_attentions=True)
    torch.testing.assert_close(weights_out, expected, atol=1e-5, rtol=1e-5)
    assert weights is not None


def forced(model, features, steps: int = 10) -> torch.Tensor:
    """Greedy tokens with a forced length (end-of-text suppressed), as bench/decode.py decodes."""
    with torch.no_grad():
        return model.generate(features, min_new_tokens=steps, max_new_tokens=steps)


def set_absorb(model, value: bool) -> None:
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.absorb = value


def test_mla_absorbed_forced_tokens_equal_expanded(fresh, context, features, decoder_ids, h):
    model = h.swap(fresh(), MlaBuilder(), kinds=("decoder.self", "decoder.cross"), context=context, rank=16)
    absorbed = forced(model, features)
    absorbed_logits = h.logits(model, features, decoder_ids, use_cache=True)
    set_absorb(model, False)
    assert torch.equal(absorbed, forced(model, features))
    torch.testing.assert_close(absorbed_logits, h.logits(model, features, decoder_ids, use_cache=True),
                               atol=5e-5, rtol=0)


def test_mla_absorbed_batch_of_one_equals_batched(fresh, context, features, h):
    """The head-batched absorption mixes no rows of different samples."""
    model = h.swap(fresh(), MlaBuilder(), context=context, rank=16)
    batched = forced(model, features)
    for i in range(features.shape[0]):
        assert torch.equal(forced(model, features[i:i + 1]), batched[i:i + 1])


def test_gqa_forced_tokens_equal_mha_with_repeated_heads(fresh, features, decoder_ids, h):
    """GQA (folded attention) equals MHA whose K/V projections repeat each pooled head over its group."""
    model = h.swap(fresh(), GqaBuilder(), kv_heads=2)
    reference = h.swap(fresh(), MhaBuilder())
    for slot in whisper.slots(model):
        gqa, mha = model.get_submodule(slot.path), reference.get_submodule(slot.path)
        assert isinstance(gqa, GroupedQueryAttention)
        rep = gqa.num_key_value_groups
        with torch.no_grad():
            for name in ("k_proj", "v_proj"):
                src, dst = getattr(gqa, name), getattr(mha, name)
                w = src.weight.view(gqa.kv_heads, 1, gqa.head_dim, -1).expand(-1, rep, -1, -1)
                dst.weight.copy_(w.reshape_as(dst.weight))
                if src.bias is not None:
                    dst.bias.copy_(src.bias.view(gqa.kv_heads, 1, -1).expand(-1, rep, -1).reshape(-1))
    assert torch.equal(forced(model, features), forced(reference, features))
    torch.testing.assert_close(h.logits(model, features, decoder_ids, use_cache=True),
                               h.logits(reference, features, decoder_ids, use_cache=True), atol=5e-5, rtol=0)
