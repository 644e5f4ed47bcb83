"""``gqa``: grouped-query attention (Ainslie et al. 2023); ``kv_heads=1`` is multi-query attention.

Conversion mean-pools the key/value projection heads of each group of ``num_heads / kv_heads`` consecutive
heads. The cache holds only ``kv_heads`` heads; attention folds each group's queries onto its shared head
(K/V are never repeated, neither in the cache nor in attention).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mla_registry.attention import GroupedQueryAttention
from mla_registry.builder import AttentionBuilder, ConversionContext, Kwarg, Slot
from mla_registry.errors import KwargError
from mla_registry.hookspecs import hookimpl


def _pool_heads(t: torch.Tensor, num_heads: int, kv_heads: int) -> torch.Tensor:
    """Mean of each group of consecutive heads along dim 0 (a weight ``[H*D, d]`` or a bias ``[H*D]``)."""
    head_dim = t.shape[0] // num_heads
    grouped = t.reshape(kv_heads, num_heads // kv_heads, head_dim, *t.shape[1:])
    return grouped.mean(dim=1).reshape(kv_heads * head_dim, *t.shape[1:])


class GqaBuilder(AttentionBuilder):
    """Builds :class:`GroupedQueryAttention`; conversion mean-pools K/V heads per group."""

    name = "gqa"
    version = "1"
    description = "Grouped-query attention: K/V heads mean-pooled into kv_heads groups (kv_heads=1: MQA)"
    kwargs = (
        Kwarg("kv_heads", int, help="number of key/value heads; must divide the slot's num_heads (1 = MQA)",
              check=lambda v: None if v >= 1 else "must be >= 1"),
    )

    def check_slot(self, slot: Slot, kwargs: Mapping[str, Any]) -> None:
        """``kv_heads`` must divide the slot's head count."""
        kv, heads = kwargs["kv_heads"], slot.num_heads
        if heads % kv:
            allowed = ", ".join(str(n) for n in range(1, heads + 1) if heads % n == 0)
            raise KwargError(f"attention 'gqa' at slot {slot.name}: kwarg 'kv_heads'={kv} does not divide "
                             f"num_heads={heads}; allowed values: {allowed}")

    def build(self, slot: Slot, **kwargs: Any) -> GroupedQueryAttention:
        """An uninitialised module for ``slot`` (the loader then loads its state dict)."""
        kwargs = self.validate(kwargs)
        self.check_slot(slot, kwargs)
        return GroupedQueryAttention(slot, kwargs["kv_heads"])

    def convert(
        self, original: nn.Module, slot: Slot, context: ConversionContext | None = None, **kwargs: Any
    ) -> GroupedQueryAttention:
        """Q and output projections copied; K/V projection heads (and V's bias) mean-pooled per group."""
        ref = original.q_proj.weight
        module = self.build(slot, **kwargs).to(device=ref.device, dtype=ref.dtype)
        heads, kv = module.num_heads, module.kv_heads
        state = dict(original.state_dict())
        for name in ("k_proj.weight", "v_proj.weight", "v_proj.bias"):
            if name in state:
                state[name] = _pool_heads(state[name].double(), heads, kv).to(ref.dtype)
        module.load_state_dict(state, strict=True)
        module.train(original.training)
        return module


@hookimpl
def register_attention(register: Any) -> None:
    """Register the ``gqa`` builder."""
    register(GqaBuilder())
