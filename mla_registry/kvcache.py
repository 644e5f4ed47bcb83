"""The KV cache a model really holds, measured on the cache object after decoding, and the figure its modules
declare. One home for both, so evaluation, the benchmark and the tests measure the same way (MHA2MLA#25 and
TransMLA#7 were "MLA" conversions whose cache stayed MHA-sized: never quote the declared figure alone)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import whisper


@dataclass
class KvBytes:
    """Bytes per sample, summed over decoder layers."""

    self_per_token: float = 0.0  # self-attention cache per cached token
    self_per_utterance: float = 0.0  # what the self-attention cache held at the end of the utterance
    cross_per_utterance: float = 0.0  # cross-attention cache (computed once from the encoder output)
    cross_per_frame: float = 0.0  # cross-attention cache per encoder frame

    def __add__(self, other: KvBytes) -> KvBytes:
        return KvBytes(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[float, float, float, float]:
        return (self.self_per_token, self.self_per_utterance, self.cross_per_utterance, self.cross_per_frame)


def _layers(cache, which: str):
    part = getattr(cache, f"{which}_attention_cache", None)
    for layer in getattr(part, "layers", []):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if torch.is_tensor(k) and k.dim() >= 3:
            yield k, v


def measure(cache) -> KvBytes:
    """What an ``EncoderDecoderCache`` holds after ``generate()`` (or any cached forward), per sample."""
    out = KvBytes()
    if cache is None:
        return out
    for which in ("self", "cross"):
        for k, v in _layers(cache, which):
            batch, length = k.shape[0], k.shape[-2]
            nbytes = k.numel() * k.element_size() + (v.numel() * v.element_size() if torch.is_tensor(v) else 0)
            if which == "self":
                out.self_per_token += nbytes / (batch * max(length, 1))
                out.self_per_utterance += nbytes / batch
            else:
                out.cross_per_utterance += nbytes / batch
                out.cross_per_frame += nbytes / (batch * max(length, 1))
    return out


def declared(model: nn.Module) -> tuple[int, int]:
    """(self-attention bytes per token, cross-attention bytes per encoder frame) that the decoder's attention
    modules declare (``kv_cache_bytes_per_token()``); stock Whisper attention: K and V of every head."""
    totals = {"decoder.self": 0, "decoder.cross": 0}
    for s in whisper.slots(model):
        if s.kind not in totals:
            continue
        module = model.get_submodule(s.path)
        if hasattr(module, "kv_cache_bytes_per_token"):
            totals[s.kind] += module.kv_cache_bytes_per_token()
        else:
            totals[s.kind] += 2 * s.embed_dim * next(module.parameters()).element_size()
    return totals["decoder.self"], totals["decoder.cross"]
