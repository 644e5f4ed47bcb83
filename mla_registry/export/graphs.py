"""The three modules traced into ONNX graphs. They call the model's own layers and attention modules (the
plugin's code, absorbed MLA decoding included) with a cache built from graph inputs, so each graph carries
exactly the cache the plugin holds: for MLA the latent (``[B, 1, T, rank]``), for GQA the pooled heads.

- :class:`EncoderGraph`: log-mel features -> encoder output.
- :class:`CrossCacheGraph`: encoder output -> every decoder layer's cross-attention cache, computed once.
- :class:`DecoderStepGraph`: one token, its position, the self-attention cache so far and the cross cache ->
  next-token logits and the self-attention cache with the token appended.

The prompt is fed one token per step, so the decoder graph always runs with one query (no causal-mask branch
for the tracer to freeze). A cache entry of zero width (MLA stores a ``[B, 1, T, 0]`` placeholder as its
values; a ``share_cross`` slot that reads another layer's latent stores zero-width keys too) is not a graph input
or output: the graph cuts it from another tensor of the same cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

from .. import whisper
from ..attention import host_cache_kwarg


class _Layer(DynamicLayer):
    """A cache layer holding given tensors and appending by concatenation. The stock layer starts from a 1-D
    empty tensor that it concatenates on dim -2, which ONNX's Concat (equal ranks) cannot express."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = keys is not None
        if keys is not None:
            self.device = keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
            self.device = key_states.device
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.is_initialized = True
        return self.keys, self.values


def make_cache(self_entries: list, cross_entries: list) -> EncoderDecoderCache:
    """An ``EncoderDecoderCache`` over ``(keys, values)`` pairs (None: empty); cross entries given are marked
    filled, so the plugins read them instead of recomputing."""
    parts = []
    for entries in (self_entries, cross_entries):
        part = DynamicCache()
        part.layers = [_Layer(*e) if e is not None else _Layer() for e in entries]
        parts.append(part)
    cache = EncoderDecoderCache(*parts)
    cache.is_updated = {i: e is not None for i, e in enumerate(cross_entries)}
    return cache


@dataclass(frozen=True)
class CacheEntry:
    """One cache tensor of one layer as the plugin holds it: ``[batch, heads, tokens, width]``."""

    name: str  # graph input/output name, e.g. "self.0.key"
    heads: int
    width: int

    def values_per_token(self) -> int:
        return self.heads * self.width

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CacheLayout:
    """Every cache tensor the graphs pass, learnt by running the plugins once (``None`` value entries: the
    plugin stores zero-width values)."""

    self_keys: tuple[CacheEntry, ...]
    self_values: tuple[CacheEntry | None, ...]
    cross_keys: tuple[CacheEntry, ...]
    cross_values: tuple[CacheEntry | None, ...]

    def names(self, which: str) -> list[str]:
        """The graph inputs/outputs of ``which`` cache, in order."""
        return [e.name for e in self.entries(which)]

    def entries(self, which: str) -> list[CacheEntry]:
        """The entries that are graph inputs/outputs: zero-width keys (a slot that reads another's entry, as
        MLA's ``share_cross``) and absent values are made inside the graph instead."""
        keys, values = (self.self_keys, self.self_values) if which == "self" else (self.cross_keys,
                                                                                  self.cross_values)
        return [e for k, v in zip(keys, values) for e in ((k,) if k.width else ()) + ((v,) if v else ())]

    def values_per_token(self, which: str) -> int:
        """Cached values per token (self) or per encoder frame (cross), summed over layers."""
        return sum(e.values_per_token() for e in self.entries(which))

    def to_json(self) -> dict:
        return {which: [e.to_json() for e in self.entries(which)] for which in ("self", "cross")}

    @classmethod
    def from_json(cls, data: dict) -> CacheLayout:
        out = {}
        for which in ("self", "cross"):
            entries = {e["name"]: CacheEntry(**e) for e in data[which]}
            layers = sorted({int(n.split(".")[1]) for n in entries})
            out[f"{which}_keys"] = tuple(entries[f"{which}.{i}.key"] for i in layers)
            out[f"{which}_values"] = tuple(entries.get(f"{which}.{i}.value") for i in layers)
        return cls(**out)


def _layers(model: nn.Module):
    return model.model.decoder.layers


def _entry(name: str, t: torch.Tensor) -> CacheEntry:
    return CacheEntry(name, int(t.shape[1]), int(t.shape[-1]))


def _split(tensors: list[torch.Tensor], keys, values) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Graph tensors (keys and values where they have width) back into per-layer (keys, values) pairs; a
    zero-width entry is cut from a tensor of the same part (the same batch and length)."""
    it = iter(tensors)
    pairs = [(next(it) if k.width else None, next(it) if v else None) for k, v in zip(keys, values)]
    ref = next(t for pair in pairs for t in pair if t is not None)
    out = []
    for k, v in pairs:
        k = ref[..., :0] if k is None else k
        out.append((k, k[..., :0] if v is None else v))
    return out


def _join(pairs, keys, values) -> list[torch.Tensor]:
    """Per-layer (keys, values) pairs as graph tensors: the inverse of :func:`_split`."""
    return [t for (k, v), ks, vs in zip(pairs, keys, values) for t in ((k,) if ks.width else ()) + ((v,) if vs else ())]


class EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features).last_hidden_state


class CrossCacheGraph(nn.Module):
    """Each decoder layer's cross-attention module run once over the encoder output with an empty cache: what
    the module stores is the cross cache (the query it also computes is discarded)."""

    def __init__(self, model: nn.Module, layout: CacheLayout | None = None) -> None:
        super().__init__()
        self.layers = _layers(model)
        self.layout = layout

    def pairs(self, encoder_hidden_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.layers)
        cache = make_cache([None] * n, [None] * n)
        probe = encoder_hidden_states[:, :1]
        for layer in self.layers:
            layer.encoder_attn(probe, key_value_states=encoder_hidden_states, **{host_cache_kwarg(): cache})
        return [(layer.keys, layer.values) for layer in cache.cross_attention_cache.layers]

    def forward(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_join(self.pairs(encoder_hidden_states), self.layout.cross_keys, self.layout.cross_values))


class DecoderStepGraph(nn.Module):
    """One decoding step through the model's own decoder layers (``attention_mask=None``: one query attends to
    every cached token, as in ``generate``)."""

    def __init__(self, model: nn.Module, layout: CacheLayout) -> None:
        super().__init__()
        self.decoder = model.model.decoder
        self.proj_out = model.proj_out
        self.layout = layout

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, *cache: torch.Tensor):
        lay = self.layout
        n_self = len(lay.names("self"))
        self_pairs = _split(list(cache[:n_self]), lay.self_keys, lay.self_values)
        cross_pairs = _split(list(cache[n_self:]), lay.cross_keys, lay.cross_values)
        kv = make_cache(self_pairs, cross_pairs)
        hidden = whisper.decoder_hidden(self.decoder, input_ids, position, None, kv, host_cache_kwarg())
        logits = self.proj_out(hidden)[:, -1]
        new_self = [(layer.keys, layer.values) for layer in kv.self_attention_cache.layers]
        return (logits, *_join(new_self, lay.self_keys, lay.self_values))


@torch.no_grad()
def learn_layout(model: nn.Module, encoder_hidden_states: torch.Tensor, start_token: int) -> CacheLayout:
    """The cache the plugins hold, read from one eager step (names, heads and widths per layer)."""
    cross = CrossCacheGraph(model).pairs(encoder_hidden_states)
    n = len(cross)
    kv = make_cache([None] * n, cross)
    ids = torch.full((encoder_hidden_states.shape[0], 1), start_token, dtype=torch.long)
    whisper.decoder_hidden(model.model.decoder, ids, torch.zeros(1, dtype=torch.long), None, kv, host_cache_kwarg())
    selfs = [(la.keys, la.values) for la in kv.self_attention_cache.layers]

    def entries(which, pairs):
        keys = tuple(_entry(f"{which}.{i}.key", k) for i, (k, _) in enumerate(pairs))
        values = tuple(_entry(f"{which}.{i}.value", v) if v.shape[-1] else None for i, (_, v) in enumerate(pairs))
        return keys, values

    sk, sv = entries("self", selfs)
    ck, cv = entries("cross", cross)
    return CacheLayout(sk, sv, ck, cv)
