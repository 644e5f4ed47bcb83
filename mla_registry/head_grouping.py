"""MHA -> GQA: which query heads share a K/V head, heads rotated into one frame before pooling, and the
attention-output error that compares groupings.

Weights are Whisper's (``[out, in]``): ``W_q, W_k, W_v, W_o`` (``d x d``), head ``h`` owning rows
``h*hd:(h+1)*hd`` of ``W_q, W_k, W_v`` and the same columns of ``W_o``. Two exact symmetries are used:

- permuting heads (rows of q/k/v and columns of o together) changes nothing, so any grouping becomes the
  contiguous one of the GQA module, baked into its weights;
- per head, an orthogonal ``R`` applied to q and k (``q R . k R = q . k``) and another applied to v and to o's
  columns (``v R (W_o R)^T = v W_o^T``) change nothing either; choosing them by Procrustes (the heads' K, resp.
  V, activations brought to their group's common frame) makes the heads of a group alike before their K/V are
  mean-pooled (Jin et al. 2024, "Align attention heads before merging them");
- more generally, any invertible per-head ``B`` on the K side (``q . B k = B^T q . k``) and ``A`` on the V
  side (``W_o (A v) = (W_o A) v``) folds into ``W_q`` and ``W_o``. :func:`fitted` uses it: each group's shared
  K head is the best rank-``head_dim`` fit of its heads' stacked keys under the scores' error (each head's
  query covariance, as the ``mla`` plugin's ``scores`` init), its shared V head that of their values; the
  per-head maps are least-squares solutions on the calibration inputs, absorbed into ``W_q``'s rows and
  ``W_o``'s columns, and V's bias (constant through softmax) into ``W_o``'s bias. Mean pooling is the special
  case ``B = A = I`` with the mean as the shared head, so the fit errs no more on its own objective.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from . import conversion_math as cm

Groups = tuple[tuple[int, ...], ...]
EXHAUSTIVE_LIMIT = 200  # groupings tried one by one below this count; greedy above


@dataclass(frozen=True)
class HeadWeights:
    """One attention's projections in float64 (``b_q``/``b_v`` may be ``None``; Whisper's K has no bias)."""

    w_q: torch.Tensor
    b_q: torch.Tensor | None
    w_k: torch.Tensor
    w_v: torch.Tensor
    b_v: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    num_heads: int

    @classmethod
    def of(cls, module, num_heads: int) -> HeadWeights:
        def get(lin, name):
            t = getattr(lin, name)
            return None if t is None else t.detach().double().cpu()
        return cls(get(module.q_proj, "weight"), get(module.q_proj, "bias"), get(module.k_proj, "weight"),
                   get(module.v_proj, "weight"), get(module.v_proj, "bias"), get(module.out_proj, "weight"),
                   get(module.out_proj, "bias"), num_heads)

    @property
    def head_dim(self) -> int:
        return self.w_q.shape[0] // self.num_heads

    def rows(self, t: torch.Tensor | None, h: int) -> torch.Tensor | None:
        hd = self.head_dim
        return None if t is None else t[h * hd:(h + 1) * hd]


def contiguous(num_heads: int, kv_heads: int) -> Groups:
    size = num_heads // kv_heads
    return tuple(tuple(range(g * size, (g + 1) * size)) for g in range(kv_heads))


def format_groups(groups: Groups) -> str:
    """``"0.3.4|1.2.5"``: heads of one group joined by dots, groups by bars (the manifest's form)."""
    return "|".join(".".join(map(str, g)) for g in groups)


def parse_groups(text: str, num_heads: int, kv_heads: int) -> Groups:
    """The inverse of :func:`format_groups`; raises ``ValueError`` unless it partitions the heads into
    ``kv_heads`` groups of equal size."""
    groups = tuple(tuple(int(h) for h in part.split(".")) for part in text.split("|"))
    flat = sorted(h for g in groups for h in g)
    if flat != list(range(num_heads)) or len(groups) != kv_heads or len({len(g) for g in groups}) != 1:
        raise ValueError(f"{text!r} is not a partition of heads 0..{num_heads - 1} into {kv_heads} equal groups")
    return groups


def partitions(num_heads: int, kv_heads: int) -> Iterator[Groups]:
    """Every way to split the heads into ``kv_heads`` unordered groups of equal size (each group sorted, the
    groups ordered by their first head)."""
    size = num_heads // kv_heads

    def rec(rest: tuple[int, ...]) -> Iterator[Groups]:
        if not rest:
            yield ()
            return
        first, others = rest[0], rest[1:]
        for mates in itertools.combinations(others, size - 1):
            group = (first, *mates)
            left = tuple(h for h in others if h not in mates)
            for tail in rec(left):
                yield (group, *tail)
    yield from rec(tuple(range(num_heads)))


def count_partitions(num_heads: int, kv_heads: int) -> int:
    size = num_heads // kv_heads
    return math.factorial(num_heads) // (math.factorial(size) ** kv_heads * math.factorial(kv_heads))


def _rotate(w: HeadWeights, rot_k: dict[int, torch.Tensor], rot_v: dict[int, torch.Tensor]) -> HeadWeights:
    """Apply per-head rotations: rows of q/k by ``R_k^T``, rows of v by ``R_v^T``, columns of o by ``R_v``."""
    w_q, w_k, w_v, w_o = w.w_q.clone(), w.w_k.clone(), w.w_v.clone(), w.w_o.clone()
    b_q = None if w.b_q is None else w.b_q.clone()
    b_v = None if w.b_v is None else w.b_v.clone()
    hd = w.head_dim
    for h, r in rot_k.items():
        s = slice(h * hd, (h + 1) * hd)
        w_q[s], w_k[s] = r.T @ w_q[s], r.T @ w_k[s]
        if b_q is not None:
            b_q[s] = r.T @ b_q[s]
    for h, r in rot_v.items():
        s = slice(h * hd, (h + 1) * hd)
        w_v[s], w_o[:, s] = r.T @ w_v[s], w_o[:, s] @ r
        if b_v is not None:
            b_v[s] = r.T @ b_v[s]
    return replace(w, w_q=w_q, b_q=b_q, w_k=w_k, w_v=w_v, b_v=b_v, w_o=w_o)


def align(w: HeadWeights, groups: Groups, inputs: torch.Tensor | None) -> HeadWeights:
    """Rotate every head of each group into the group's common frame (generalised Procrustes on the heads'
    K activations for q/k, on their V activations for v/o; on the weights alone when ``inputs`` is None)."""
    x = torch.eye(w.w_k.shape[1], dtype=torch.float64) if inputs is None else inputs.double()
    rot_k, rot_v = {}, {}
    for group in groups:
        keys = [x @ w.rows(w.w_k, h).T for h in group]
        values = [x @ w.rows(w.w_v, h).T + (0 if w.b_v is None else w.rows(w.b_v, h)) for h in group]
        rot_k.update(zip(group, cm.align_heads(keys)))
        rot_v.update(zip(group, cm.align_heads(values)))
    return _rotate(w, rot_k, rot_v)


def permute(w: HeadWeights, order: list[int]) -> HeadWeights:
    """Heads reordered to ``order`` (rows of q/k/v, columns of o): the same attention."""
    hd = w.head_dim
    idx = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in order])
    return replace(w, w_q=w.w_q[idx], b_q=None if w.b_q is None else w.b_q[idx], w_k=w.w_k[idx], w_v=w.w_v[idx],
                   b_v=None if w.b_v is None else w.b_v[idx], w_o=w.w_o[:, idx])


def pooled(w: HeadWeights, groups: Groups, inputs: torch.Tensor | None, do_align: bool
           ) -> tuple[HeadWeights, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(weights with heads permuted so groups are contiguous, pooled W_k, pooled W_v, pooled b_v)``: the GQA
    conversion under ``groups`` (aligned first when ``do_align``)."""
    if do_align:
        w = align(w, groups, inputs)
    w = permute(w, [h for g in groups for h in g])
    kv, size, hd = len(groups), len(groups[0]), w.head_dim

    def pool(t):
        return None if t is None else t.reshape(kv, size, hd, *t.shape[1:]).mean(1).reshape(kv * hd, *t.shape[1:])
    return w, pool(w.w_k), pool(w.w_v), pool(w.b_v)


Converted = tuple[HeadWeights, torch.Tensor, torch.Tensor, torch.Tensor | None]
Conversion = Callable[[HeadWeights, Groups], Converted]  # what output_error and search compare groupings by


def mean_pooling(inputs: torch.Tensor | None, do_align: bool) -> Conversion:
    """:func:`pooled` as a :data:`Conversion`."""
    return lambda w, groups: pooled(w, groups, inputs, do_align)


def fitting(keys: cm.InputStats, queries: cm.InputStats) -> Conversion:
    """:func:`fitted` as a :data:`Conversion`."""
    return lambda w, groups: fitted(w, groups, keys, queries)


def fitted(w: HeadWeights, groups: Groups, keys: cm.InputStats, queries: cm.InputStats) -> Converted:
    """The GQA conversion under ``groups`` by least-squares fitted shared heads (see the module docstring):
    ``(weights with heads permuted, W_q's rows and W_o's columns and bias absorbing the per-head maps; the
    shared W_k; the shared W_v; V's bias, zero)``. ``keys``/``queries``: statistics of the slot's K/V and query
    inputs on calibration data."""
    w = permute(w, [h for g in groups for h in g])
    kv, size, hd = len(groups), len(groups[0]), w.head_dim
    roots = cm.query_roots(w.w_q, w.b_q, queries, w.num_heads, centre=True)
    centred = keys.centred()
    w_q, w_o = w.w_q.clone(), w.w_o.clone()
    b_q = None if w.b_q is None else w.b_q.clone()
    b_o = None if w.b_o is None else w.b_o.clone()
    v_gram = keys.gram if w.b_v is None else centred  # a V bias to absorb makes V's problem a centred one
    shared_k, shared_v = [], []
    for g in range(kv):
        rows = slice(g * size * hd, (g + 1) * size * hd)
        w_k, w_v = w.w_k[rows], w.w_v[rows]
        _, d_k = cm.spectrum(w_k, centred, torch.block_diag(*roots[g * size:(g + 1) * size])).factors(w_k, hd)
        _, d_v = cm.spectrum(w_v, v_gram).factors(w_v, hd)
        a_k, a_v = cm.least_squares_up(w_k, d_k, centred), cm.least_squares_up(w_v, d_v, v_gram)
        for i in range(size):
            s, local = slice((g * size + i) * hd, (g * size + i + 1) * hd), slice(i * hd, (i + 1) * hd)
            w_q[s] = a_k[local].T @ w.w_q[s]
            if b_q is not None:
                b_q[s] = a_k[local].T @ w.b_q[s]
            w_o[:, s] = w.w_o[:, s] @ a_v[local]
            if b_o is not None and w.b_v is not None:
                b_o += w.w_o[:, s] @ (w.b_v[s] + (w.w_v[s] - a_v[local] @ d_v) @ keys.mean)
        shared_k.append(d_k)
        shared_v.append(d_v)
    b_v = None if w.b_v is None else torch.zeros(kv * hd, dtype=torch.float64)
    return replace(w, w_q=w_q, b_q=b_q, w_o=w_o, b_o=b_o), torch.cat(shared_k), torch.cat(shared_v), b_v


@dataclass(frozen=True)
class Probe:
    """Calibration queries and key/value inputs for the attention-output error: ``chunks`` of (queries
    ``[m, d]``, keys ``[t, d]``, causal) standing in for utterances (the calibration capture keeps no utterance
    boundaries: cross-attention pairs a sample of all queries with each encoder output of ``frames`` frames;
    self-attention cuts the token stream into causal windows)."""

    chunks: tuple[tuple[torch.Tensor, torch.Tensor, bool], ...]

    @classmethod
    def of(cls, queries: torch.Tensor, keys: torch.Tensor, is_cross: bool, frames: int = 1500,
           max_queries: int = 256, max_chunks: int = 2, window: int = 32) -> Probe:
        g = torch.Generator().manual_seed(0)
        q = queries.double()
        if is_cross:
            pick = torch.randperm(q.shape[0], generator=g)[:max_queries]
            n = max(1, min(max_chunks, keys.shape[0] // frames))
            step = frames if keys.shape[0] >= frames else keys.shape[0]
            return cls(tuple((q[pick], keys[i * step:(i + 1) * step].double(), False) for i in range(n)))
        count = min(max_chunks * max_queries // window, q.shape[0] // window) or 1
        starts = torch.linspace(0, max(0, q.shape[0] - window), count).long().tolist()
        return cls(tuple((q[s:s + window], q[s:s + window], True) for s in starts))


def _output(w: HeadWeights, k_w: torch.Tensor, v_w: torch.Tensor, b_v: torch.Tensor | None, kv_heads: int,
            xq: torch.Tensor, xk: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention output with ``kv_heads`` K/V heads shared by contiguous query groups."""
    heads, hd = w.num_heads, w.head_dim
    q = xq @ w.w_q.T + (0 if w.b_q is None else w.b_q)
    k = xk @ k_w.T
    v = xk @ v_w.T + (0 if b_v is None else b_v)
    q = q.view(-1, heads, hd).transpose(0, 1)  # [H, m, hd]
    k = k.view(-1, kv_heads, hd).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    v = v.view(-1, kv_heads, hd).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(hd)
    if causal:
        m = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(xq.shape[0], heads * hd)
    return out @ w.w_o.T + (0 if w.b_o is None else w.b_o)


def reference_outputs(w: HeadWeights, probe: Probe) -> list[torch.Tensor]:
    """The unconverted (MHA) attention output on each chunk of ``probe``: what :func:`output_error` compares
    with (compute it once when comparing many conversions)."""
    return [_output(w, w.w_k, w.w_v, w.b_v, w.num_heads, q, k, c) for q, k, c in probe.chunks]


def output_error(w: HeadWeights, groups: Groups, probe: Probe, convert: Conversion,
                 reference: list[torch.Tensor] | None = None) -> float:
    """Squared attention-output error of the GQA conversion ``convert`` under ``groups`` against the MHA on
    ``probe`` (``reference``: :func:`reference_outputs`), relative to the MHA output's squared norm."""
    if reference is None:
        reference = reference_outputs(w, probe)
    pw, k_w, v_w, b_v = convert(w, groups)
    err = sum(float((_output(pw, k_w, v_w, b_v, len(groups), q, k, c) - ref).square().sum())
              for (q, k, c), ref in zip(probe.chunks, reference))
    return err / sum(float(ref.square().sum()) for ref in reference)


def search(w: HeadWeights, kv_heads: int, probe: Probe, convert: Conversion) -> tuple[Groups, float]:
    """The grouping with the least :func:`output_error` under ``convert``: every partition when there are at
    most ``EXHAUSTIVE_LIMIT``, else greedy (groups filled one head at a time, each time with the head whose
    addition to the partial grouping, the rest contiguous, errs least). Contiguous is always a candidate, so
    the result is never worse than it on this objective."""
    reference = reference_outputs(w, probe)

    def cost(groups: Groups) -> float:
        return output_error(w, groups, probe, convert, reference)

    base = contiguous(w.num_heads, kv_heads)
    best, best_err = base, cost(base)
    if count_partitions(w.num_heads, kv_heads) <= EXHAUSTIVE_LIMIT:
        candidates: Iterator[Groups] = partitions(w.num_heads, kv_heads)
    else:
        candidates = iter([_greedy(w.num_heads, kv_heads, cost)])
    for groups in candidates:
        if groups == base:
            continue
        err = cost(groups)
        if err < best_err:
            best, best_err = groups, err
    return best, best_err


def _greedy(num_heads: int, kv_heads: int, cost) -> Groups:
    size = num_heads // kv_heads
    done: list[tuple[int, ...]] = []
    left = list(range(num_heads))
    while left:
        group = [left.pop(0)]
        while len(group) < size:
            def trial(h: int, group: list[int] = group) -> float:
                rest = [x for x in left if x != h]
                return cost(tuple(tuple(sorted(g)) for g in _fill([*done, (*group, h)], rest, size)))
            pick = min(left, key=trial)
            group.append(pick)
            left.remove(pick)
        done.append(tuple(sorted(group)))
    return tuple(done)


def _fill(partial: list[tuple[int, ...]], rest: list[int], size: int) -> list[tuple[int, ...]]:
    """A full grouping from an incomplete last group: it is topped up, then the rest grouped contiguously."""
    *complete, last = partial
    need = size - len(last)
    last = (*last, *rest[:need])
    rest = rest[need:]
    return [*complete, last, *[tuple(rest[i:i + size]) for i in range(0, len(rest), size)]]
