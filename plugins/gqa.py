"""``gqa``: grouped-query attention (Ainslie et al. 2023); ``kv_heads=1`` is multi-query attention.

Conversion (``pool="mean"``, default) mean-pools the key/value projection heads of each group of
``num_heads / kv_heads`` consecutive heads. The cache holds only ``kv_heads`` heads; attention folds each
group's queries onto its shared head (K/V are never repeated, neither in the cache nor in attention).

``pool="fit"`` fits each group's shared K/V head instead: the shared K head is the best ``head_dim``-wide fit
of the group's stacked keys under the error of the attention scores (each head's query covariance on
calibration data, as ``mla:init=scores``), the shared V head that of its values; each head keeps its own
least-squares map from the shared head, folded into its query rows (``q . B k = B^T q . k``) and its output
projection columns (``W_o A v``), V's bias into the output bias. The module is the same GQA module (nothing
is added per step); mean pooling is the special case ``B = A = I``. Orthogonal alignment is then redundant
(the maps include every rotation).

``grouping="search"`` chooses which heads share a K/V head on calibration data: the grouping with the least
attention-output error (every partition when there are few, e.g. the 10 ways to split 6 heads in 2 groups of 3;
greedy otherwise); ``align=true`` first rotates each head into its group's common frame by orthogonal Procrustes
(q/k by one rotation, v/o by another: the unpooled model is unchanged). Heads are permuted so each group is
contiguous, which leaves the output unchanged too, so the module is the same for every grouping; the chosen
grouping is recorded per slot (``groups``, e.g. ``0.3.4|1.2.5``). See :mod:`mla_registry.head_grouping`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mla_registry import conversion_math as cm
from mla_registry import head_grouping as hg
from mla_registry.attention import SlotAttention, attend, cached_states
from mla_registry.builder import AttentionBuilder, ConversionContext, Equivalence, Kwarg, Slot
from mla_registry.errors import KwargError
from mla_registry.hookspecs import hookimpl

POOLS = ("mean", "fit")
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


class GqaBuilder(AttentionBuilder):
    """Builds :class:`GroupedQueryAttention`; conversion mean-pools (or fits) K/V heads per group."""

    name = "gqa"
    version = "2"  # 2: pool=fit
    description = "Grouped-query attention: K/V heads pooled (mean or fitted) into kv_heads groups (kv_heads=1: MQA)"
    kwargs = (
        Kwarg("kv_heads", int, help="number of key/value heads; must divide the slot's num_heads (1 = MQA)",
              check=lambda v: None if v >= 1 else "must be >= 1"),
        Kwarg("pool", str, default="mean", choices=POOLS, build=False,
              help="how a group's K/V heads become one: 'mean' (their average) or 'fit' (least-squares fitted on "
                   "calibration data, per-head maps folded into the query and output projections)"),
        Kwarg("grouping", str, default="contiguous", choices=("contiguous", "search"), build=False,
              help="which query heads share a K/V head: consecutive ones, or searched on calibration data by "
                   "attention-output error"),
        Kwarg("align", bool, default=False, build=False,
              help="rotate heads into their group's frame (orthogonal Procrustes on calibration K/V) before "
                   "pooling"),
        Kwarg("groups", str, default=None, build=False,
              help="the grouping itself, e.g. '0.3.4|1.2.5' (chosen by 'grouping' unless given)"),
    )
    parameter_groups = GROUPS

    def check_slot(self, slot: Slot, kwargs: Mapping[str, Any]) -> None:
        """``kv_heads`` must divide the slot's head count."""
        kv, heads = kwargs["kv_heads"], slot.num_heads
        if heads % kv:
            allowed = ", ".join(str(n) for n in range(1, heads + 1) if heads % n == 0)
            raise KwargError(f"attention 'gqa' at slot {slot.name}: kwarg 'kv_heads'={kv} does not divide "
                             f"num_heads={heads}; allowed values: {allowed}")
        if kwargs["pool"] == "fit" and kwargs["align"]:
            raise KwargError(f"attention 'gqa' at slot {slot.name}: kwarg 'align'=true has no effect with "
                             "pool='fit' (its per-head maps include every rotation); drop one of them")
        if kwargs.get("groups") is not None:
            try:
                hg.parse_groups(kwargs["groups"], heads, kv)
            except ValueError as exc:
                raise KwargError(f"attention 'gqa' at slot {slot.name}: kwarg 'groups': {exc}") from None

    def equivalences(self, slot: Slot) -> list[Equivalence]:
        return [Equivalence("kv_heads = num_heads reproduces the original", {"kv_heads": slot.num_heads})]

    def build(self, slot: Slot, **kwargs: Any) -> GroupedQueryAttention:
        """An uninitialised module for ``slot`` (the loader then loads its state dict)."""
        return GroupedQueryAttention(slot, kwargs["kv_heads"])

    def convert(self, original: nn.Module, slot: Slot, context: ConversionContext | None = None,
                **kwargs: Any) -> GroupedQueryAttention:
        """Heads permuted so each group is contiguous (aligned first with ``align``); K/V projection heads (and
        V's bias) mean-pooled per group, Q and output projections carried; or, with ``pool="fit"``, fitted."""
        module = self.build(slot, **self.build_kwargs(kwargs))
        heads, kv = module.num_heads, module.kv_heads
        groups = (hg.contiguous(heads, kv) if kwargs.get("groups") is None
                  else hg.parse_groups(kwargs["groups"], heads, kv))
        w, k, v, b_v = _conversion(slot, context, kwargs)(hg.HeadWeights.of(original, heads), groups)
        state = {"q_proj.weight": w.w_q, "k_proj.weight": k, "v_proj.weight": v, "out_proj.weight": w.w_o}
        for name, t in (("q_proj.bias", w.b_q), ("v_proj.bias", b_v), ("out_proj.bias", w.b_o)):
            if t is not None:
                state[name] = t
        dtype = original.q_proj.weight.dtype
        module.to(dtype=dtype).load_state_dict({n: t.to(dtype) for n, t in state.items()}, strict=True)
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

    def plan(self, slots: list[Slot], kwargs: Mapping[str, Any], context: ConversionContext | None
             ) -> dict[str, dict[str, Any]]:
        """Each slot's grouping (given, contiguous, or searched on calibration data), recorded as ``groups``."""
        out = {}
        for slot in slots:
            groups = kwargs.get("groups")
            if groups is None and kwargs["grouping"] == "search":
                if context is None:
                    raise KwargError("attention 'gqa': grouping='search' needs calibration audio (a conversion "
                                     "context)")
                weights = hg.HeadWeights.of(context.original(slot), slot.num_heads)
                probe = hg.Probe.of(context.query_inputs(slot), context.calibration_inputs(slot), slot.is_cross,
                                    frames=getattr(slot.config, "max_source_positions", 1500))
                convert = _conversion(slot, context, kwargs)
                groups = hg.format_groups(hg.search(weights, kwargs["kv_heads"], probe, convert)[0])
            elif groups is None:
                groups = hg.format_groups(hg.contiguous(slot.num_heads, kwargs["kv_heads"]))
            out[slot.path] = {**kwargs, "groups": groups}
        return out


def _conversion(slot: Slot, context: ConversionContext | None, kwargs: Mapping[str, Any]) -> hg.Conversion:
    """The slot's pooling under ``kwargs`` (``pool``, ``align``) on its calibration data."""
    if kwargs["pool"] == "fit":
        if context is None:
            raise KwargError(f"attention 'gqa' at slot {slot.name}: pool='fit' needs calibration audio (a "
                             "conversion context)")
        return hg.fitting(cm.stats_of(context.calibration_inputs(slot)), cm.stats_of(context.query_inputs(slot)))
    inputs = _sample(context.calibration_inputs(slot)) if kwargs["align"] and context is not None else None
    return hg.mean_pooling(inputs, kwargs["align"])


def _sample(x: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    """At most ``rows`` evenly spaced rows of ``x`` (Procrustes needs the heads' joint statistics, not every
    token)."""
    step = max(1, x.shape[0] // rows)
    return x[::step][:rows].double().cpu()


@hookimpl
def register_attention(register: Any) -> None:
    """Register the ``gqa`` builder."""
    register(GqaBuilder())
