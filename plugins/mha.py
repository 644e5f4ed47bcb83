"""``mha``: Whisper's own multi-head attention, re-implemented on :func:`mla_registry.attention.attend`.

The reference variant: same parameter names as ``WhisperAttention`` (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``), so converting copies the state dict and the outputs are those of the stock model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mla_registry.builder import AttentionBuilder, ConversionContext, Equivalence, Slot
from mla_registry.hookspecs import hookimpl
from mla_registry.plugins.gqa import GROUPS, GroupedQueryAttention


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
    parameter_groups = GROUPS

    def equivalences(self, slot: Slot) -> list[Equivalence]:
        return [Equivalence("a copy of the original", {})]

    def build(self, slot: Slot, **kwargs: Any) -> MultiHeadAttention:
        """An uninitialised module for ``slot`` (the loader then loads its state dict)."""
        return MultiHeadAttention(slot)

    def convert(self, original: nn.Module, slot: Slot, context: ConversionContext | None = None,
                **kwargs: Any) -> MultiHeadAttention:
        """A module carrying ``original``'s weights (same names)."""
        module = self.build(slot, **kwargs).to(dtype=original.q_proj.weight.dtype)
        module.load_state_dict({k: v.detach().cpu() for k, v in original.state_dict().items()}, strict=True)
        return module

    def to_stock(self, module: MultiHeadAttention, slot: Slot) -> dict[str, torch.Tensor]:
        """The weights as they are: the parameter names are ``WhisperAttention``'s."""
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


@hookimpl
def register_attention(register: Any) -> None:
    """Register the ``mha`` builder."""
    register(MhaBuilder())
