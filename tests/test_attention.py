"""mla_registry.attention: one attention call with the causal handling the host relies on (folded grouped
queries equal repeated K/V), and the host's call normalised across transformers releases (the cache under
either name; an unknown name is an error, never a dropped cache)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from mla_registry import attention
from mla_registry.attention import attend, causal_mask
from mla_registry.errors import HostInterfaceError


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


@pytest.mark.parametrize("kv_heads,dim,uses_sdpa", [(6, 64, False), (2, 64, False), (1, 192, True)])
def test_decode_steps_over_narrow_heads_run_as_matmuls_with_the_same_result(monkeypatch, kv_heads, dim, uses_sdpa):
    """An unmasked decode step over many (batch x K/V head) slices of narrow heads skips SDPA (slower for it on
    CPU) and equals the reference; MLA's wide latent keeps SDPA."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(8, 6, 1, dim, generator=g)
    k, v = torch.randn(8, kv_heads, 40, dim, generator=g), torch.randn(8, kv_heads, 40, dim, generator=g)
    calls = []
    sdpa = nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    out, _ = attend(_Flags(causal=True), q, k, v, None, scale=0.25)
    torch.testing.assert_close(out, reference(q, k, v, None, True, 0.25), atol=1e-5, rtol=1e-5)
    assert bool(calls) == uses_sdpa
    calls.clear()
    attend(_Flags(causal=True), q[:1], k[:1], v[:1], None, scale=0.25)  # batch 1: too few slices, SDPA
    assert calls


def test_attend_bottom_right_causal_with_cached_prefix():
    """q > 1 new tokens after a cached prefix, no mask: the rows equal full causal attention's last rows."""
    class Causal(nn.Module):
        is_causal, dropout, training = True, 0.0, False

        def dropout_p(self) -> float:
            return 0.0

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    full, _ = attend(Causal(), q, k, v, None)
    tail, _ = attend(Causal(), q[:, :, 4:], k, v, None)
    torch.testing.assert_close(tail, full[:, :, 4:])
    assert causal_mask(2, 4, torch.device("cpu")).tolist() == [[True, True, True, False], [True] * 4]


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
