"""Machinery shared by the attention modules of the built-in plugins (``mha``, ``gqa``, ``mla``).

- :class:`SlotAttention`: the attributes every replacement keeps from Whisper's ``WhisperAttention``
  (``embed_dim``, ``num_heads``, ``head_dim``, ``scaling``, ``is_causal``, ``layer_idx``, ...).
- :func:`attend`: one scaled-dot-product-attention call with the causal handling the host model relies on.
  Whisper's decoder passes ``attention_mask=None`` under SDPA (generate and teacher-forced training) and
  expects the module to apply causality itself; forgetting it trains a non-causal decoder without any error.
- :func:`select_cache` / :func:`cached_states` / :func:`filled_cross_keys`: the ``EncoderDecoderCache`` protocol
  of ``WhisperAttention`` (self-attention appends, cross-attention computes once and reuses; a slot may read
  another cross slot's filled entry).
- :meth:`SlotAttention.forward`: the host model's call, whatever name the installed transformers gives the cache
  (``past_key_values`` up to 5.23, ``cache`` from 5.24), normalised once here; plugins implement
  :meth:`SlotAttention.attention`, whose signature mla-registry owns and keeps stable.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache

from .builder import Slot
from .errors import HostInterfaceError

KV = tuple[torch.Tensor, torch.Tensor]

# The names transformers has given the cache argument of ``WhisperAttention.forward``, newest first.
CACHE_KWARGS = ("cache", "past_key_values")


@functools.cache
def host_cache_kwarg() -> str:
    """The name under which the installed transformers passes the cache to Whisper's attention modules, read
    from ``WhisperAttention.forward``'s signature; a :class:`HostInterfaceError` when it is none we know (a
    release that renamed it again: decoding would silently run without a cache)."""
    from transformers.models.whisper.modeling_whisper import WhisperAttention

    params = inspect.signature(WhisperAttention.forward).parameters
    for name in CACHE_KWARGS:
        if name in params:
            return name
    raise HostInterfaceError(
        f"transformers {transformers.__version__}: WhisperAttention.forward takes its cache under none of "
        f"{', '.join(CACHE_KWARGS)} (its parameters: {', '.join(params)}). This mla-registry does not know this "
        "release; install the transformers version pyproject.toml allows (pip install -e . or 'mla-registry[...]')"
    )


def host_cache(past_key_values: Cache | None, cache: Cache | None, kwargs: dict[str, Any]) -> Cache | None:
    """The cache the host passed, under either name; refuses two different caches, and a ``Cache`` under a
    name this module does not know (it would otherwise be dropped in ``**kwargs`` and decoding would run
    without a cache, producing wrong tokens with no error)."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise HostInterfaceError("the host model passed two different caches (past_key_values= and cache=)")
    stray = sorted(k for k, v in kwargs.items() if isinstance(v, Cache))
    if stray:
        raise HostInterfaceError(
            f"transformers {transformers.__version__} passed the attention cache as {', '.join(stray)}=, a name "
            f"mla-registry does not know ({', '.join(CACHE_KWARGS)}); decoding would silently drop it"
        )
    return cache if cache is not None else past_key_values


class SlotAttention(nn.Module):
    """Base of the replacement modules: the shape facts and flags of the slot it fills, named as in
    ``WhisperAttention`` so the host model and transformers' utilities find what they expect."""

    def __init__(self, slot: Slot) -> None:
        super().__init__()
        host_cache_kwarg()  # fail at build time, not with wrong tokens, on a host whose cache name is unknown
        if slot.embed_dim % slot.num_heads:
            raise ValueError(f"slot {slot.name}: embed_dim {slot.embed_dim} is not divisible by "
                             f"{slot.num_heads} heads")
        self.embed_dim = slot.embed_dim
        self.num_heads = slot.num_heads
        self.head_dim = slot.embed_dim // slot.num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = slot.dropout
        self.is_causal = slot.is_causal
        self.is_decoder = slot.kind.startswith("decoder")
        self.is_cross = slot.is_cross
        self.layer_idx = slot.layer_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        *,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``WhisperAttention``'s call and return, on every transformers release the project allows: the cache
        arrives as ``past_key_values=`` (<= 5.23), ``cache=`` (>= 5.24) or third positional argument (both);
        it is handed to :meth:`attention` under one name. Cross-attention when ``key_value_states`` is given."""
        cache = host_cache(past_key_values, cache, kwargs)
        return self.attention(hidden_states, key_value_states, cache, attention_mask, output_attentions)

    def attention(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None,
        cache: Cache | None,
        attention_mask: torch.Tensor | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover - abstract
        """What a plugin implements: attention output ``[B, q, embed_dim]`` and weights (or None).
        ``cache`` is the host's cache (an ``EncoderDecoderCache`` in generate, None without a cache)."""
        raise NotImplementedError

    def param_bytes(self) -> int:
        """Bytes per element of the module's parameters (the dtype its cache will hold)."""
        return next(self.parameters()).element_size()

    def kv_cache_bytes_per_token(self) -> int:  # pragma: no cover - abstract
        """Bytes the cache holds per cached token per sample (for a cross slot: per encoder frame)."""
        raise NotImplementedError

    def split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """``[B, T, heads * D]`` -> ``[B, heads, T, D]`` (contiguous, as the stock module makes it)."""
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2).contiguous()

    def query(self, q_proj: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
        """Queries ``[B, H, q, D]``, pre-scaled by ``head_dim**-0.5`` exactly as Whisper does (attention then
        runs with scale 1.0; keeping this order keeps the outputs bit-identical to the stock module)."""
        return self.split_heads(q_proj(hidden_states) * self.scaling, self.num_heads)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, q, D]`` -> ``[B, q, H * D]``."""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1).contiguous()

    def dropout_p(self) -> float:
        """Attention-probability dropout: the slot's rate while training, none in eval."""
        return self.dropout if self.training else 0.0


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[q_len, kv_len]`` mask (True = may attend), aligned bottom-right: query ``i`` is the token at
    position ``kv_len - q_len + i`` and sees every key up to it (the cached prefix included)."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)


def attend(
    module: SlotAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scale: float = 1.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``query [B, H, q, D]`` over ``key [B, Hk, T, D]`` / ``value [B, Hk, T, Dv]`` (``Hk``
    divides ``H``: grouped or multi-query attention without repeating K/V).
    Returns ``([B, H, q, Dv], weights or None)``.

    Causality: a given mask is used as is; with no mask, a causal module with ``q > 1`` attends causally
    (SDPA's ``is_causal`` when there is no cached prefix, an explicit bottom-right mask when there is one).
    Weights are only computed (by an explicit softmax) when ``output_attentions`` asks for them.
    """
    q_len, kv_len = query.shape[-2], key.shape[-2]
    gqa = key.shape[1] != query.shape[1]
    mask = attention_mask
    use_causal_flag = False
    if mask is None and module.is_causal and q_len > 1:
        if kv_len == q_len:
            use_causal_flag = True
        else:
            mask = causal_mask(q_len, kv_len, query.device)
    dropout = module.dropout_p()

    if output_attentions:
        if gqa:
            rep = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        if use_causal_flag:
            mask = causal_mask(q_len, kv_len, query.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, dim=-1)
        probs = nn.functional.dropout(weights, p=dropout, training=module.training)
        return torch.matmul(probs, value), weights

    if gqa:
        # Fold each group's query heads into the query-length axis: [B, Hk, g * q, D] against [B, Hk, T, D].
        # Same result as SDPA's ``enable_gqa`` (query head h uses key head h // g), but one attention per K/V
        # head with g * q query rows: about 1.6x faster on CPU for multi-query decoding (MLA's latent) and never
        # slower for grouped heads (bench/decode.py; tests compare it with the repeated-K/V reference).
        batch, heads, _, dim = query.shape
        groups = heads // key.shape[1]
        if use_causal_flag:
            mask, use_causal_flag = causal_mask(q_len, kv_len, query.device), False
        if mask is not None:
            mask = mask.expand(batch, heads, q_len, kv_len).reshape(batch, key.shape[1], groups * q_len, kv_len)
        folded = query.reshape(batch, key.shape[1], groups * q_len, dim)
        out = _sdpa_or_matmul(folded, key, value, mask, dropout, scale, False)
        return out.view(batch, heads, q_len, value.shape[-1]), None
    return _sdpa_or_matmul(query, key, value, mask, dropout, scale, use_causal_flag), None


# Decode-step attention (a few query rows per K/V head, no mask) over narrow heads runs as two matmuls and a
# softmax instead of SDPA on CPU when there are at least this many (batch x K/V head) slices: PyTorch's CPU
# flash-attention kernel is slower for such calls. Three interleaved runs per setting on whisper-tiny.en's
# decoder at batch 16 (2-core EPYC, torch 2.13, ms per step, SDPA -> matmul): 6 heads of 64 (mha) 27.5, 28.5,
# 25.1 -> 24.5, 24.5, 24.0; 2 K/V heads (gqa2) 19.5, 19.2, 19.1 -> 20.8, 17.7, 17.8. At batch 1 the matmul path
# was no faster (mha 9.0-10.0 -> 10.3-11.1), nor for MLA's wide latent (rank 192 at batch 16: 23.1-25.4 ->
# 24.9-25.7), where SDPA stays.
MATMUL_DECODE_MAX_DIM = 64
MATMUL_DECODE_MIN_SLICES = 8
MATMUL_DECODE_MAX_ROWS = 8


def _sdpa_or_matmul(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    dropout: float, scale: float, is_causal: bool) -> torch.Tensor:
    """SDPA, or for an unmasked decode step over narrow heads on CPU the same attention as
    ``softmax(q k^T * scale) v`` in two batched matmuls (see :data:`MATMUL_DECODE_MAX_DIM`)."""
    if (mask is None and not dropout and not is_causal and query.device.type == "cpu"
            and query.shape[-2] <= MATMUL_DECODE_MAX_ROWS and key.shape[-1] <= MATMUL_DECODE_MAX_DIM
            and key.shape[0] * key.shape[1] >= MATMUL_DECODE_MIN_SLICES):
        scores = torch.matmul(query, key.transpose(-1, -2))
        if scale != 1.0:
            scores = scores * scale
        return torch.matmul(torch.softmax(scores, dim=-1), value)
    return nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                      scale=scale, is_causal=is_causal)


def select_cache(cache: Cache | None, layer_idx: int | None, is_cross: bool) -> tuple[Cache | None, bool]:
    """The part of the host's ``cache`` this call uses, and whether its cross-attention entry is filled.

    Mirrors ``WhisperAttention``: for an ``EncoderDecoderCache`` a cross-attention call reads and then sets
    ``is_updated[layer_idx]``; self-attention uses ``self_attention_cache``. A plain cache is used as is.
    """
    if not isinstance(cache, EncoderDecoderCache):
        return cache, False
    is_updated = bool(cache.is_updated.get(layer_idx))
    if is_cross:
        cache.is_updated[layer_idx] = True
        return cache.cross_attention_cache, is_updated
    return cache.self_attention_cache, is_updated


def cached_states(cache: Cache | None, layer_idx: int | None, is_cross: bool, compute: Callable[[], KV]) -> KV:
    """The (keys, values) entry this call attends over: ``compute()`` of the new tokens appended to the cache,
    or, for cross-attention whose cache is already filled, the cached entry itself (no recomputation).

    What is stored is up to the module (MLA stores its latent as keys and a zero-width tensor as values).
    """
    part, is_updated = select_cache(cache, layer_idx, is_cross)
    if is_cross and part is not None and is_updated:
        layer = part.layers[layer_idx]
        return layer.keys, layer.values
    keys, values = compute()
    if part is not None:
        keys, values = part.update(keys, values, layer_idx)
    return keys, values


def filled_cross_keys(cache: Cache | None, layer_idx: int) -> torch.Tensor | None:
    """The keys cross-attention slot ``layer_idx`` stored in ``cache`` (None while that entry is unfilled): how a
    slot reads a latent another layer caches for both (MLA's ``share_cross``)."""
    if not isinstance(cache, EncoderDecoderCache) or not cache.is_updated.get(layer_idx):
        return None
    layers = cache.cross_attention_cache.layers
    return layers[layer_idx].keys if layer_idx < len(layers) else None
