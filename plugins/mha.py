"""``mha``: Whisper's own multi-head attention, re-implemented on :func:`mla_registry.attention.attend`.

The reference variant: same parameter names as ``WhisperAttention`` (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``), so converting copies the state dict and the outputs are those of the stock model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mla_registry.attention import GroupedQueryAttention
from mla_registry.builder import AttentionBuilder, ConversionContext, Slot
from mla_registry.hookspecs import hookimpl


class MultiHeadAttention(GroupedQueryAttention):
    """Multi-head attention with Whisper's interface: one K/V head per query head (``2 * embed_dim`` cached
    values per token), the same parameter names as ``WhisperAttention``."""

    def __init__(self, slot: Slot) -> None:
        super().__init__(slot, kv_heads=slot.num_heads)


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
