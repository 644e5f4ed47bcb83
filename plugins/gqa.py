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

from mla_registry.attention import SlotAttention, attend, cached_states
from mla_registry.builder import AttentionBuilder, ConversionContext, Equivalence, Kwarg, Slot
from mla_registry.errors import KwargError
from mla_registry.hookspecs import hookimpl

GROUPS = {"query": ("q_proj.",), "kv": ("k_proj.", "v_proj."), "output": ("out_proj.",)}


class GroupedQueryAttention(SlotAttention):
    """Whisper-interface attention with ``kv_heads`` key/value heads shared by groups of query heads
    (``kv_heads == num_heads``: ordinary multi-head attention, parameter for parameter ``WhisperAttention``)."""

    def __init__(self, slot: Slot, kv_heads: int) -> None:
        super().__init__(slot)
        self.kv_heads = kv_heads
        self.num_key_value_groups = self.num_heads // kv_heads
        d, kv_dim = self.embed_dim, kv_heads * self.head_dim
        self.k_proj = nn.Linear(d, kv_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_dim, bias=slot.bias)
        self.q_proj = nn.Linear(d, d, bias=slot.bias)
        self.out_proj = nn.Linear(d, d, bias=slot.bias)

    def attention(self, hidden_states, key_value_states, cache, attention_mask, output_attentions):
        """K/V projected (or read from the cache) for ``kv_heads`` heads; queries folded onto them."""
        is_cross = key_value_states is not None
        source = key_value_states if is_cross else hidden_states
        query = self.query(self.q_proj, hidden_states)

        def project() -> tuple[torch.Tensor, torch.Tensor]:
            return (self.split_heads(self.k_proj(source), self.kv_heads),
                    self.split_heads(self.v_proj(source), self.kv_heads))

        key, value = cached_states(cache, self.layer_idx, is_cross, project)
        out, weights = attend(self, query, key, value, attention_mask, output_attentions=output_attentions)
        return self.out_proj(self.merge_heads(out)), weights

    def kv_cache_bytes_per_token(self) -> int:
        """K and V for ``kv_heads`` heads: ``2 * kv_heads * head_dim`` elements per token."""
        return 2 * self.kv_heads * self.head_dim * self.param_bytes()


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
    parameter_groups = GROUPS

    def check_slot(self, slot: Slot, kwargs: Mapping[str, Any]) -> None:
        """``kv_heads`` must divide the slot's head count."""
        kv, heads = kwargs["kv_heads"], slot.num_heads
        if heads % kv:
            allowed = ", ".join(str(n) for n in range(1, heads + 1) if heads % n == 0)
            raise KwargError(f"attention 'gqa' at slot {slot.name}: kwarg 'kv_heads'={kv} does not divide "
                             f"num_heads={heads}; allowed values: {allowed}")

    def equivalences(self, slot: Slot) -> list[Equivalence]:
        return [Equivalence("kv_heads = num_heads reproduces the original", {"kv_heads": slot.num_heads})]

    def build(self, slot: Slot, **kwargs: Any) -> GroupedQueryAttention:
        """An uninitialised module for ``slot`` (the loader then loads its state dict)."""
        return GroupedQueryAttention(slot, kwargs["kv_heads"])

    def convert(self, original: nn.Module, slot: Slot, context: ConversionContext | None = None,
                **kwargs: Any) -> GroupedQueryAttention:
        """Q and output projections copied; K/V projection heads (and V's bias) mean-pooled per group."""
        module = self.build(slot, **kwargs)
        heads, kv = module.num_heads, module.kv_heads
        state = {k: v.detach().cpu() for k, v in original.state_dict().items()}
        for name in ("k_proj.weight", "v_proj.weight", "v_proj.bias"):
            if name in state:
                state[name] = _pool_heads(state[name].double(), heads, kv).to(state[name].dtype)
        module.to(dtype=state["q_proj.weight"].dtype).load_state_dict(state, strict=True)
        return module

    def to_stock(self, module: GroupedQueryAttention, slot: Slot) -> dict[str, torch.Tensor]:
        """Each pooled K/V head repeated over the query heads of its group: stock attention whose heads of a
        group share K and V, so outputs are unchanged (exact; the cache saving is lost)."""
        groups = module.num_heads // module.kv_heads
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        for name in ("k_proj.weight", "v_proj.weight", "v_proj.bias"):
            if name in state:
                t = state[name]
                state[name] = t.reshape(module.kv_heads, module.head_dim, *t.shape[1:]).repeat_interleave(
                    groups, dim=0).reshape(module.embed_dim, *t.shape[1:])
        return state


@hookimpl
def register_attention(register: Any) -> None:
    """Register the ``gqa`` builder."""
    register(GqaBuilder())
