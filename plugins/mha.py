"""``mha``: Whisper's own multi-head attention, re-implemented on :func:`mla_registry.attention.attend`.

The reference variant: same parameter names as ``WhisperAttention`` (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``), so converting copies the state dict and the outputs are those of the stock model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from mla_registry.attention import SlotAttention, attend, cached_states
from mla_registry.builder import AttentionBuilder, ConversionContext, Slot
from mla_registry.hookspecs import hookimpl


class MultiHeadAttention(SlotAttention):
    """Multi-head attention with Whisper's interface; caches full K and V (``2 * embed_dim`` values/token)."""

    def __init__(self, slot: Slot) -> None:
        super().__init__(slot)
        d = self.embed_dim
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=slot.bias)
        self.q_proj = nn.Linear(d, d, bias=slot.bias)
        self.out_proj = nn.Linear(d, d, bias=slot.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same call and return as ``WhisperAttention.forward``; cross-attention when ``key_value_states``."""
        is_cross = key_value_states is not None
        source = key_value_states if is_cross else hidden_states
        query = self.query(self.q_proj, hidden_states)

        def project() -> tuple[torch.Tensor, torch.Tensor]:
            return (self.split_heads(self.k_proj(source), self.num_heads),
                    self.split_heads(self.v_proj(source), self.num_heads))

        key, value = cached_states(past_key_values, self.layer_idx, is_cross, project)
        out, weights = attend(self, query, key, value, attention_mask, output_attentions=output_attentions)
        return self.out_proj(self.merge_heads(out)), weights

    def kv_cache_bytes_per_token(self) -> int:
        """K and V for every head: ``2 * embed_dim`` elements per token."""
        return 2 * self.embed_dim * self.param_bytes()


class MhaBuilder(AttentionBuilder):
    """Builds :class:`MultiHeadAttention`; conversion copies the pretrained weights unchanged."""

    name = "mha"
    version = "1"
    description = "Multi-head attention: the original Whisper attention re-implemented on SDPA (baseline)"
    kwargs = ()

    def build(self, slot: Slot, **kwargs: Any) -> MultiHeadAttention:
        """An uninitialised module for ``slot`` (the loader then loads its state dict)."""
        self.validate(kwargs)
        return MultiHeadAttention(slot)

    def convert(
        self, original: nn.Module, slot: Slot, context: ConversionContext | None = None, **kwargs: Any
    ) -> MultiHeadAttention:
        """A module carrying ``original``'s weights (same names), on its device and dtype."""
        ref = original.q_proj.weight
        module = self.build(slot, **kwargs).to(device=ref.device, dtype=ref.dtype)
        module.load_state_dict(original.state_dict(), strict=True)
        module.train(original.training)
        return module


@hookimpl
def register_attention(register: Any) -> None:
    """Register the ``mha`` builder."""
    register(MhaBuilder())
