"""``mla``: multi-head latent attention (DeepSeek-V2) converted from a pretrained Whisper attention.

Keys and values are up-projected from one shared latent ``c = kv_down(x)`` of width ``rank``; only ``c`` is
cached (``rank`` values per token instead of ``2 * embed_dim``). The cache layer stores the latent as its
keys, ``[B, 1, T, rank]``, and a zero-width ``[B, 1, T, 0]`` tensor as its values, so the host cache's
sequence length and beam reordering keep working unchanged.

Conversion factorises the stacked ``W = [W_k; W_v]`` (``2d x d``) as ``W ~ U U^T W`` with ``U``
(``2d x rank``) orthonormal: ``k_up``/``v_up`` are ``U``'s K/V rows, ``kv_down = U^T W``. ``init="svd"``
takes ``U`` from the SVD of ``W``; ``init="activation"`` (default) from the SVD of ``W L`` with
``L L^T = X^T X`` over the module's real inputs ``X`` on calibration audio, i.e. the principal directions of
the actual K/V activations, which minimises their reconstruction error. ``init="attention"`` minimises what
attention sees instead (:mod:`mla_registry.conversion_math`): the SVD of ``G W L`` with ``L`` from the *centred*
input covariance (a key offset shared by all tokens does not change softmax; V's mean goes into its bias),
``G``'s K block the per-head root of the query second moment ``E[q_h q_h^T]`` (error of the scores ``q . k``),
its V block the root of ``W_o^T W_o`` (error after the output projection), each block scaled to unit energy so
K and V share the rank by relative error; then ``D = U_r^T G W``, ``A = G^-1 U_r`` and the least-squares V bias.
``init="scores"`` keeps only the score part: ``G_k`` from the per-head query *covariance*, ``G_v = I``, K and V
at their natural scale (measured better than ``attention`` on whisper-tiny.en's cross-attention; see the study).
``init="output"`` is ``scores`` with V's block weighted by a factor ``v_weight`` chosen per slot from
``V_WEIGHTS`` by the error of the attention *output* (softmax and ``W_o`` included) of the factorised slot on
the calibration audio, at its rank: how the rank splits between K and V is then decided by what the output
loses, not by the two blocks' scales (``v_weight=1`` is ``scores``, so it errs no more than it on that probe).
The chosen factor is recorded per slot; with ``share_cross`` one factor serves the shared latent, chosen by
the cross slots' summed output error.
``refit=true`` re-solves ``k_up``, ``v_up`` and V's bias by least squares on the calibration inputs for the
chosen ``kv_down`` (SVD-LLM's update; the attention init is already its own least-squares solution).
``rank == embed_dim`` reproduces the original exactly.

``budget=F`` instead of ``rank``: ranks per slot under one KV budget (``F`` of the selected slots' original
K/V cache, ``2 * embed_dim`` per token each), allocated greedily on each slot's calibration error vs rank
(water-filling, see :func:`mla_registry.conversion_math.allocate_ranks`) so the ranks sum to the budget exactly;
``budget_scope="kind"`` (default) gives self- and cross-attention slots the budget separately, ``"all"`` makes
them compete. Each slot's rank is recorded in the manifest.

``share_cross=true``: the decoder's cross-attention slots converted together share **one** latent. Every cross
slot reads the same encoder output, so one ``c = D h`` can feed all their up-projections: ``D`` comes from one
SVD of the slots' stacked objectives (``[G_1 W_1; G_2 W_2; ...] L``, the init's own weights and inputs), each
slot's ``k_up``/``v_up`` and V bias are refitted by least squares for it. The lowest layer caches ``c``
(``latent_from`` = its cache index, recorded per slot); the others store a zero-width entry and read that one. A
shared latent of width ``embed_dim`` is exact and caches ``1 / (2 * layers)`` of the cross K/V (tiny.en's 4
layers: 1/8); a budget gives the shared latent ``budget * 2 * embed_dim * layers`` (at most ``embed_dim``). The
shared ``kv_down`` is fixed (``requires_grad=False``): fine-tuning trains the per-layer up-projections, so the
copies of ``D`` every slot holds (for cache-less calls) stay equal.

Absorption (``absorb=True``): in eval mode with a cache (decoding: ``generate()`` or a cached forward)
``W_uk`` is applied on the query side and ``W_uv`` after attention, so attention runs over the latent as
multi-query attention and K/V are never re-expanded (the win for cross-attention over 1500 encoder frames).
The per-head ``W_uk``/``W_uv`` are views of ``k_up``/``v_up`` applied with one head-batched ``bmm`` each, so
nothing derived is stored or goes stale, and nothing is copied per step. Training and cache-less calls (the
encoder, teacher-forced loss) re-expand K/V and run ordinary attention.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from mla_registry import conversion_math as cm
from mla_registry import head_grouping as hg
from mla_registry.attention import SlotAttention, attend, cached_states, filled_cross_keys
from mla_registry.builder import AttentionBuilder, ConversionContext, Equivalence, Kwarg, Slot
from mla_registry.errors import KwargError
from mla_registry.hookspecs import hookimpl

INITS = ("activation", "svd", "attention", "scores", "output")
V_WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # init="output": the V weights tried per slot
SCOPES = ("kind", "all")


class MultiHeadLatentAttention(SlotAttention):
    """Whisper-interface attention whose K and V come from one cached latent of width ``rank``."""

    def __init__(self, slot: Slot, rank: int, absorb: bool = True, latent_from: int | None = None) -> None:
        super().__init__(slot)
        self.rank = rank
        self.absorb = absorb
        self.latent_from = latent_from
        d = self.embed_dim
        self.q_proj = nn.Linear(d, d, bias=slot.bias)
        self.kv_down = nn.Linear(d, rank, bias=False)
        self.k_up = nn.Linear(rank, d, bias=False)
        self.v_up = nn.Linear(rank, d, bias=slot.bias)
        self.out_proj = nn.Linear(d, d, bias=slot.bias)
        if latent_from is not None:
            self.kv_down.weight.requires_grad_(False)  # shared by the cross slots: every copy must stay equal

    @property
    def reads_shared_latent(self) -> bool:
        """Whether this module's cached latent is another cross slot's entry (``share_cross``)."""
        return self.latent_from is not None and self.latent_from != self.layer_idx

    def attention(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None,
        cache: Cache | None,
        attention_mask: torch.Tensor | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The latent projected (or read from the cache); absorbed or re-expanded attention over it."""
        is_cross = key_value_states is not None
        source = key_value_states if is_cross else hidden_states
        query = self.query(self.q_proj, hidden_states)
        shared = is_cross and cache is not None and self.reads_shared_latent

        def project() -> tuple[torch.Tensor, torch.Tensor]:
            if shared:  # the latent lives in the owner's entry: this slot's own entry holds nothing
                empty = source.new_zeros((source.shape[0], 1, source.shape[1], 0))
                return empty, empty
            latent = self.kv_down(source).unsqueeze(1)  # [B, 1, T, rank]
            return latent, latent.new_zeros((*latent.shape[:-1], 0))

        latent, _ = cached_states(cache, self.layer_idx, is_cross, project)
        if shared:
            latent = filled_cross_keys(cache, self.latent_from)
            if latent is None or latent.shape[-1] != self.rank:
                raise RuntimeError(f"MLA cross-attention at cache index {self.layer_idx} reads the shared latent of "
                                   f"index {self.latent_from}, but that entry is "
                                   f"{'empty' if latent is None else f'{latent.shape[-1]} wide, not {self.rank}'}: "
                                   "the slot that caches it must run first, with the same cache")
        if self.absorb and not self.training and cache is not None:
            out, weights = self._absorbed(query, latent, attention_mask, output_attentions)
        else:
            c = latent.squeeze(1)
            key = self.split_heads(self.k_up(c), self.num_heads)
            value = self.split_heads(self.v_up(c), self.num_heads)
            out, weights = attend(self, query, key, value, attention_mask,
                                  output_attentions=output_attentions)
        return self.out_proj(self.merge_heads(out)), weights

    def _absorbed(
        self, query: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None, output_attentions: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention in latent space: ``q_h W_uk_h`` against ``c`` (scale 1.0: ``q`` is already scaled, so
        the scores equal ``q_h . k_h``), then ``(softmax . c) W_uv_h^T + b_v_h`` per head.
        Returns ``[B, H, q, head_dim]``.

        Both absorptions are one ``bmm`` with the heads as its batch (``[H, B*q, .]`` against the per-head
        views of ``k_up``/``v_up``): the weights are read in place, never broadcast over the batch (the
        broadcasting ``matmul`` this replaces copied both ``[B, H, head_dim, rank]`` weights every step, about
        75 MB per step at batch 16 for tiny.en). Attention itself runs as one multi-query call with the heads
        folded into the query rows (see :func:`mla_registry.attention.attend`)."""
        batch, heads, q_len, hd = query.shape
        rank = self.rank
        w_uk = self.k_up.weight.view(heads, hd, rank)
        w_uv = self.v_up.weight.view(heads, hd, rank)
        by_head = query.transpose(0, 1).reshape(heads, batch * q_len, hd)
        q_latent = torch.bmm(by_head, w_uk).view(heads, batch, q_len, rank).transpose(0, 1)  # [B, H, q, rank]
        mixed, weights = attend(self, q_latent, latent, latent, mask, scale=1.0,
                                output_attentions=output_attentions)
        mixed = mixed.transpose(0, 1).reshape(heads, batch * q_len, rank)
        if self.v_up.bias is not None:
            out = torch.baddbmm(self.v_up.bias.view(heads, 1, hd), mixed, w_uv.transpose(1, 2))
        else:
            out = torch.bmm(mixed, w_uv.transpose(1, 2))
        return out.view(heads, batch, q_len, hd).transpose(0, 1), weights  # [B, H, q, head_dim]

    def kv_cache_bytes_per_token(self) -> int:
        """Only the latent: ``rank`` elements per token (none where another cross slot caches it)."""
        return 0 if self.reads_shared_latent else self.rank * self.param_bytes()


class MlaBuilder(AttentionBuilder):
    """Builds :class:`MultiHeadLatentAttention`; conversion factorises ``[W_k; W_v]`` (SVD or
    activation-aware)."""

    name = "mla"
    version = "2"  # 2: share_cross (kwarg latent_from)
    description = "Multi-head latent attention: K/V up-projected from one cached rank-r latent (DeepSeek-V2)"
    kwargs = (
        Kwarg("rank", int, default=None, help="latent width cached per token (1..embed_dim; embed_dim reproduces "
              "MHA); required unless 'budget' is given", check=lambda v: None if v >= 1 else "must be >= 1"),
        Kwarg("init", str, default="activation", choices=INITS, build=False,
              help="factorisation: 'activation' (PCA of real K/V activations on the conversion's calibration "
                   "audio), 'svd' (of the weights alone), 'attention' (errors of the scores q.k and of W_o v, "
                   "K/V balanced), 'scores' (score error under the query covariance, V plain, no balancing) or "
                   "'output' ('scores' with V's weight chosen per slot by the attention-output error)"),
        Kwarg("v_weight", float, default=None, build=False,
              help="init='output': V's weight against the score-weighted K; chosen per slot on calibration data "
                   "(and recorded) when unset", check=lambda v: None if v > 0 else "must be > 0"),
        Kwarg("refit", bool, default=False, build=False,
              help="least-squares refit of k_up, v_up and V's bias on the calibration inputs after the basis"),
        Kwarg("budget", float, default=None, build=False,
              help="instead of rank: fraction of the selected slots' original K/V cache; ranks per slot chosen "
                   "on calibration error", check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        Kwarg("budget_scope", str, default="kind", choices=SCOPES, build=False,
              help="'kind': self and cross slots each meet the budget; 'all': one budget over every slot"),
        Kwarg("absorb", bool, default=True,
              help="decode in latent space (W_uk folded into queries, W_uv into the output) in eval mode"),
        Kwarg("share_cross", bool, default=False, build=False,
              help="the cross-attention slots converted together share one cached latent (the lowest layer "
                   "caches it); its down-projection is fixed"),
        Kwarg("latent_from", int, default=None,
              help="set by share_cross (never by hand): the cache index of the cross slot whose cached latent "
                   "this slot reads (its own index for the slot that caches it)"),
    )
    parameter_groups = {"query": ("q_proj.",), "kv": ("kv_down.", "k_up.", "v_up."), "output": ("out_proj.",)}

    def check_slot(self, slot: Slot, kwargs: Mapping[str, Any]) -> None:
        """``rank`` must lie in 1..embed_dim: ``[W_k; W_v]`` has rank <= embed_dim, so a wider latent would
        only cost cache."""
        if kwargs.get("latent_from") is not None and not slot.is_cross:
            raise KwargError(f"attention 'mla' at slot {slot.name}: kwarg 'latent_from' applies to cross-attention "
                             "slots only (set by share_cross=true)")
        if kwargs.get("v_weight") is not None and kwargs["init"] != "output":
            raise KwargError(f"attention 'mla' at slot {slot.name}: kwarg 'v_weight' applies to init='output' only "
                             f"(init is '{kwargs['init']}')")
        rank = kwargs["rank"]
        if rank is None:
            if kwargs.get("budget") is None:
                raise KwargError(f"attention 'mla' at slot {slot.name}: give kwarg 'rank' (1..{slot.embed_dim}) "
                                 "or 'budget' (a fraction of the K/V cache, e.g. 0.125)")
            return
        if not 1 <= rank <= slot.embed_dim:
            raise KwargError(f"attention 'mla' at slot {slot.name}: kwarg 'rank'={rank}; allowed values: "
                             f"1..{slot.embed_dim} (embed_dim; {slot.embed_dim} reproduces the original)")

    def equivalences(self, slot: Slot) -> list[Equivalence]:
        return [Equivalence("rank = embed_dim reproduces the original", {"rank": slot.embed_dim}),
                Equivalence("absorbed decoding equals re-expanded K/V", {"absorb": True}, {"absorb": False},
                            atol=2e-4)]

    def build(self, slot: Slot, **kwargs: Any) -> MultiHeadLatentAttention:
        """An uninitialised module for ``slot`` (the loader then loads its state dict)."""
        return MultiHeadLatentAttention(slot, kwargs["rank"], absorb=kwargs.get("absorb", True),
                                        latent_from=kwargs.get("latent_from"))

    def convert(self, original: nn.Module, slot: Slot, context: ConversionContext | None = None,
                **kwargs: Any) -> MultiHeadLatentAttention:
        """Q and output projections copied; ``[W_k; W_v]`` factorised to ``rank``; V's bias kept on
        ``v_up``."""
        module = self.build(slot, **self.build_kwargs(kwargs))
        d = slot.embed_dim
        w = _kv_weight(original).double().cpu()
        bias = None if original.v_proj.bias is None else original.v_proj.bias.detach().double().cpu()
        if kwargs.get("latent_from") is not None:
            down = self._shared.pop((slot.path, id(context)), None)
            if down is None:
                raise KwargError(f"attention 'mla' at slot {slot.name}: a shared latent (share_cross) is planned "
                                 "over all the cross slots at once: convert through mla_registry.surgery "
                                 "(mla-registry convert), not slot by slot")
            up = None
        else:
            v_weight = kwargs.get("v_weight")
            if kwargs["init"] == "output" and v_weight is None:
                v_weight = _choose_v_weight([slot], context, _own_down(slot, context, kwargs["rank"]))
            up, down = _spectrum(original, slot, context, kwargs["init"], v_weight).factors(w, kwargs["rank"])
        if up is None or kwargs["init"] in ("attention", "scores", "output") or kwargs["refit"]:
            if context is None:
                raise KwargError(f"attention 'mla' at slot {slot.name}: kwarg 'refit' needs calibration audio "
                                 "(a conversion context)")
            up, bias = cm.refit_up(w, bias, down, cm.stats_of(context.calibration_inputs(slot)))
        state = {k: v.detach().cpu() for k, v in original.state_dict().items() if k.startswith(("q_proj.",
                                                                                             "out_proj."))}
        state["kv_down.weight"] = down
        state["k_up.weight"] = up[:d]
        state["v_up.weight"] = up[d:]
        if bias is not None:
            state["v_up.bias"] = bias
        dtype = original.q_proj.weight.dtype
        module.to(dtype=dtype).load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
        return module

    def to_stock(self, module: MultiHeadLatentAttention, slot: Slot) -> dict[str, torch.Tensor]:
        """K and V re-expanded: ``W_k = k_up . kv_down``, ``W_v = v_up . kv_down`` (products in float64, then
        the module's dtype), V's bias kept. Exact up to rounding: the latent is linear and carries no bias, so
        ``k_up(kv_down(x)) == W_k x``; the cache becomes full K/V again (2 * embed_dim per token)."""
        down = module.kv_down.weight.detach().double()
        dtype = module.kv_down.weight.dtype
        state = {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(("q_proj.",
                                                                                              "out_proj."))}
        state["k_proj.weight"] = (module.k_up.weight.detach().double() @ down).to(dtype)
        state["v_proj.weight"] = (module.v_up.weight.detach().double() @ down).to(dtype)
        if module.v_up.bias is not None:
            state["v_proj.bias"] = module.v_up.bias.detach().clone()
        return state

    def __init__(self) -> None:
        self._shared: dict[tuple[str, int], torch.Tensor] = {}  # planned shared kv_down, by (slot path, context)

    def plan(self, slots: list[Slot], kwargs: Mapping[str, Any], context: ConversionContext | None
             ) -> dict[str, dict[str, Any]]:
        """Per-slot kwargs: with ``budget``, each slot's rank, allocated on its calibration error vs rank (the
        init's own objective, relative to rank 0) so that the ranks of each scope sum to ``budget * embed_dim``
        per slot (the K/V cache is ``2 * embed_dim`` per token; a rank-``r`` latent caches ``r``); with
        ``share_cross``, the cross slots' one latent (its width and its ``kv_down``, kept for :meth:`convert`)."""
        if kwargs.get("latent_from") is not None:
            raise KwargError("attention 'mla': kwarg 'latent_from' is set by share_cross=true, not given")
        shared = [s for s in slots if s.is_cross] if kwargs["share_cross"] else []
        if kwargs["share_cross"]:
            if not shared:
                raise KwargError("attention 'mla': share_cross=true but the spec selects no cross-attention slot")
            if kwargs.get("budget") is not None and kwargs["budget_scope"] == "all":
                raise KwargError("attention 'mla': share_cross=true gives the cross slots one latent; use "
                                 "budget_scope='kind' (the self slots then meet the budget on their own)")
        rest = [s for s in slots if s not in shared]
        if kwargs.get("budget") is None:
            out = super().plan(rest, kwargs, context)
            if kwargs["init"] == "output" and kwargs.get("v_weight") is None:
                for slot in rest:
                    out[slot.path]["v_weight"] = _choose_v_weight([slot], context, _own_down(slot, context,
                                                                                             kwargs["rank"]))
        else:
            out = self._budget_ranks(rest, kwargs, context)
        if shared:
            out.update(self._share(shared, kwargs, context))
        return out

    def _budget_ranks(self, slots: list[Slot], kwargs: Mapping[str, Any], context: ConversionContext | None
                      ) -> dict[str, dict[str, Any]]:
        scopes: dict[str, list[Slot]] = {}
        for slot in slots:
            scopes.setdefault(slot.kind if kwargs["budget_scope"] == "kind" else "all", []).append(slot)
        out = {}
        for members in scopes.values():
            total = _budget_total(members, kwargs["budget"])
            v_weights = [kwargs.get("v_weight")] * len(members)
            if kwargs["init"] == "output" and kwargs.get("v_weight") is None:  # chosen at the budget's mean rank
                v_weights = [_choose_v_weight([s], context, _own_down(s, context, max(1, total // len(members))))
                             for s in members]
            energies = [_spectrum(_original(context, s), s, context, kwargs["init"], v).energy
                        for s, v in zip(members, v_weights)]
            for slot, rank, v in zip(members, cm.allocate_ranks(energies, total), v_weights):
                out[slot.path] = {**kwargs, "rank": rank, **({} if v is None else {"v_weight": v})}
        return out

    def _share(self, slots: list[Slot], kwargs: Mapping[str, Any], context: ConversionContext | None
               ) -> dict[str, dict[str, Any]]:
        """One latent for the cross ``slots``: its width (``rank``, or the budget's share capped at
        ``embed_dim``) and ``kv_down`` from one SVD of the stacked objectives."""
        d = slots[0].embed_dim
        rank = kwargs["rank"] if kwargs.get("budget") is None else min(d, _budget_total(slots, kwargs["budget"]))

        base = [_objective(_original(context, s), s, context, kwargs["init"]) for s in slots]

        def shared_down(v_weight: float | None) -> list[torch.Tensor]:
            problems = [_v_weighted(p, v_weight) for p in base]
            w = torch.cat([p[0] for p in problems])
            g = None if problems[0][2] is None else torch.block_diag(*[p[2] for p in problems])
            return [cm.spectrum(w, problems[0][1], g).factors(w, rank)[1]] * len(slots)

        v_weight = kwargs.get("v_weight")
        if kwargs["init"] == "output" and v_weight is None:
            v_weight = _choose_v_weight(slots, context, shared_down)
        down = shared_down(v_weight)[0]
        owner = min(s.layer_idx for s in slots)
        for s in slots:
            self._shared[(s.path, id(context))] = down
        extra = {} if v_weight is None else {"v_weight": v_weight}
        return {s.path: {**kwargs, "rank": rank, "latent_from": owner, **extra} for s in slots}


def _original(context: ConversionContext | None, slot: Slot) -> nn.Module:
    if context is None:
        raise KwargError("attention 'mla': kwargs 'budget' and 'share_cross' need a conversion context (the "
                         "original modules and, except for init='svd' without sharing, calibration audio)")
    return context.original(slot)


def _budget_total(slots: list[Slot], budget: float) -> int:
    """``budget`` of the slots' K/V cache (``2 * embed_dim`` values per token each) as a whole latent width."""
    cache = sum(2 * s.embed_dim for s in slots)
    total = budget * cache
    if abs(total - round(total)) > 1e-6:
        raise KwargError(f"attention 'mla': budget={budget} of a cache of {cache} values per token is {total:g}, "
                         "not a whole number of latent dimensions")
    return round(total)


def _objective(original: nn.Module, slot: Slot, context: ConversionContext | None, init: str,
               v_weight: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``init``'s problem for one slot, as :func:`mla_registry.conversion_math.spectrum` takes it: ``(W, input
    Gram or None, output weight G or None)`` (see the module docstring)."""
    w = _kv_weight(original)
    if init == "svd":
        return w, None, None
    if context is None:
        raise KwargError(f"attention 'mla' at slot {slot.name}: kwarg 'init'='{init}' needs calibration audio "
                         "(a conversion context); use init='svd' without one")
    stats = cm.stats_of(context.calibration_inputs(slot))
    if init == "activation":
        return w, stats.gram, None
    options = {} if init == "attention" else {"centre_queries": True, "weight_values": False, "balance": False}
    g = cm.attention_weight(w, stats, original.q_proj.weight.detach(), _detached(original.q_proj.bias),
                            cm.stats_of(context.query_inputs(slot)), original.out_proj.weight.detach(), slot.num_heads,
                            **options)
    problem = w, stats.centred(), g
    return _v_weighted(problem, 1.0 if v_weight is None else v_weight) if init == "output" else problem


def _v_weighted(problem: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None], v_weight: float | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``init="output"``'s problem for a V weight, from the slot's problem at weight 1 (``scores``): ``G``'s V
    block scaled (a copy), so the candidate weights share one objective; ``None`` leaves it as it is."""
    w, gram, g = problem
    if v_weight is None or g is None:
        return problem
    d = w.shape[1]
    g = g.clone()
    g[d:, d:] *= v_weight
    return w, gram, g


def _spectrum(original: nn.Module, slot: Slot, context: ConversionContext | None, init: str,
              v_weight: float | None = None) -> cm.Spectrum:
    """Every rank's factorisation of ``[W_k; W_v]`` under ``init``'s objective."""
    return cm.spectrum(*_objective(original, slot, context, init, v_weight))


def _own_down(slot: Slot, context: ConversionContext | None, rank: int
              ) -> Callable[[float], list[torch.Tensor]]:
    """For :func:`_choose_v_weight`: the slot's own rank-``rank`` ``kv_down`` under ``init="output"`` with a
    given V weight (the slot's objective computed once, on the first call, for all the weights)."""
    @functools.cache
    def problem() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return _objective(_original(context, slot), slot, context, "output")

    def down(v_weight: float) -> list[torch.Tensor]:
        return [cm.spectrum(*_v_weighted(problem(), v_weight)).factors(problem()[0], rank)[1]]
    return down


def _choose_v_weight(slots: list[Slot], context: ConversionContext | None,
                     downs: Callable[[float], list[torch.Tensor]]) -> float:
    """``init="output"``: the factor of :data:`V_WEIGHTS` whose factorisation (``downs(v)``: each slot's
    ``kv_down``, one shared by all with ``share_cross``; up-projections by least squares, as
    :meth:`MlaBuilder.convert` makes them) errs least on the slots' attention outputs over the calibration
    probe (:func:`mla_registry.head_grouping.output_error`, summed over the slots); ties go to the smaller
    factor."""
    if context is None:
        raise KwargError(f"attention 'mla' at slot {slots[0].name}: kwarg 'init'='output' needs calibration audio "
                         "(a conversion context)")
    probes = []
    for slot in slots:
        original, inputs = _original(context, slot), context.calibration_inputs(slot)
        probe = hg.Probe.of(context.query_inputs(slot), inputs, slot.is_cross,
                            frames=getattr(slot.config, "max_source_positions", 1500))
        bias = None if original.v_proj.bias is None else original.v_proj.bias.detach().double().cpu()
        heads = hg.HeadWeights.of(original, slot.num_heads)
        probes.append((heads, probe, hg.reference_outputs(heads, probe), _kv_weight(original).double().cpu(), bias,
                       cm.stats_of(inputs)))

    def error(v_weight: float) -> float:
        total = 0.0
        for (heads, probe, reference, w, bias, stats), down in zip(probes, downs(v_weight)):
            up, b = cm.refit_up(w, bias, down, stats)
            kv, d = up @ down.double(), w.shape[1]
            total += hg.output_error(heads, hg.contiguous(heads.num_heads, heads.num_heads), probe,
                                     lambda weights, _groups, kv=kv, b=b, d=d: (weights, kv[:d], kv[d:], b),
                                     reference)
        return total

    errors = [error(v) for v in V_WEIGHTS]
    return V_WEIGHTS[min(range(len(V_WEIGHTS)), key=lambda i: (errors[i], i))]


def _kv_weight(original: nn.Module) -> torch.Tensor:
    """The stacked ``[W_k; W_v]`` (``2d x d``) that every init factorises."""
    return torch.cat([original.k_proj.weight, original.v_proj.weight]).detach()


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


@hookimpl
def register_attention(register: Any) -> None:
    """Register the ``mla`` builder."""
    register(MlaBuilder())
