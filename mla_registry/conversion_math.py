"""The linear algebra of one-shot attention conversion (MLA factorisations, rank budgets, GQA head alignment).

Notation: a slot's stacked K/V projection ``W = [W_k; W_v]`` (``2d x d``), V's bias ``b``, calibration inputs
``X`` (``n x d``, rows are tokens) summarised by :class:`InputStats`. An MLA factorisation is
``W ~ A D`` with ``D`` = ``kv_down`` (``r x d``) and ``A = [A_k; A_v]`` = ``[k_up; v_up]`` (``2d x r``) plus a
V bias ``b'``. Every function works in float64 on CPU and returns float64.

The error a conversion is judged by (:func:`kv_error`) is the one attention sees: K's error *centred* (adding
the same vector to every key adds one constant to each query's scores, which softmax ignores), V's error with
its bias, both measured through an output-side weight ``G`` (``||G (W - A D) x||``; ``G = I`` unweighted).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

RIDGE = 1e-6  # relative ridge on the input Grams: keeps Choleskys defined, so full rank stays exact
SOLVE_RIDGE = 1e-11  # relative ridge of the least-squares normal equations (only guards exact singularity)


@dataclass(frozen=True)
class InputStats:
    """Sufficient statistics of inputs ``X``: token count ``n``, sum ``s = X^T 1`` and Gram ``X^T X``."""

    n: int
    total: torch.Tensor  # [d]
    gram: torch.Tensor  # [d, d]

    @classmethod
    def of(cls, x: torch.Tensor, chunk: int = 16384) -> InputStats:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            raise ValueError("calibration inputs are empty")
        gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        for i in range(0, x.shape[0], chunk):
            part = x[i:i + chunk].detach().double().cpu()
            gram += part.T @ part
            total += part.sum(0)
        if not torch.isfinite(gram).all() or torch.trace(gram) <= 0:
            raise ValueError("calibration inputs are zero or not finite")
        return cls(x.shape[0], total, gram)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.n

    def centred(self) -> torch.Tensor:
        """``(X - 1 mu^T)^T (X - 1 mu^T)``: the Gram of the centred inputs."""
        return self.gram - torch.outer(self.total, self.total) / self.n


_STATS: dict[int, tuple[weakref.ref, InputStats]] = {}


def stats_of(x: torch.Tensor) -> InputStats:
    """:meth:`InputStats.of` ``x``, computed once per tensor (the cross slots share one encoder output, and a
    plan and its conversion read the same inputs); entries die with their tensor."""
    hit = _STATS.get(id(x))
    if hit is not None and hit[0]() is x:
        return hit[1]
    stats = InputStats.of(x)
    key = id(x)
    _STATS[key] = (weakref.ref(x, lambda _ref: _STATS.pop(key, None)), stats)
    return stats


def ridged_cholesky(gram: torch.Tensor) -> torch.Tensor:
    """Lower ``L`` with ``L L^T = gram + RIDGE * (tr/dim) I``."""
    gram = gram.double()
    scale = torch.trace(gram) / gram.shape[0]
    return torch.linalg.cholesky(gram + RIDGE * scale * torch.eye(gram.shape[0], dtype=gram.dtype))


def _fix_signs(u: torch.Tensor) -> torch.Tensor:
    """Flip each column so its largest-magnitude entry is positive (SVD signs are otherwise arbitrary)."""
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    return u * torch.where(signs == 0, torch.ones_like(signs), signs)


@dataclass(frozen=True)
class Spectrum:
    """The weighted problem solved once for every rank: ``G W L = U S V^T`` (``L L^T`` the input Gram).
    The best rank-``r`` factorisation under the weight is ``D = U_r^T G W``, ``A = G^{-1} U_r``; its error is
    ``sum(S[r:]**2)``."""

    u: torch.Tensor  # [2d, d] orthonormal columns
    energy: torch.Tensor  # [d] squared singular values, descending
    g: torch.Tensor  # [2d, 2d] output-side weight (identity when unweighted)

    def relative_error(self, rank: int) -> float:
        """Error left at ``rank`` over the error at rank 0, under this spectrum's own objective."""
        return float(self.energy[rank:].sum() / self.energy.sum())

    def factors(self, w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, D)``: up (``2d x rank``) and down (``rank x d``) projections."""
        u = self.u[:, :rank]
        down = u.T @ self.g @ w.double()
        return torch.linalg.solve(self.g, u), down


def spectrum(w: torch.Tensor, gram: torch.Tensor | None = None, g: torch.Tensor | None = None) -> Spectrum:
    """Solve ``min ||G (W - A D) L||`` for every rank at once by one SVD of ``G W L`` (``L`` from ``gram``;
    no ``gram``: ``L = I``, a plain SVD of the weights)."""
    w = w.double().cpu()
    g = torch.eye(w.shape[0], dtype=torch.float64) if g is None else g.double()
    m = g @ w
    if gram is not None:
        m = m @ ridged_cholesky(gram)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    return Spectrum(_fix_signs(u), s ** 2, g)


def _upper_root(gram: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """Upper ``R`` with ``R^T R = gram + damping * (tr/dim) I`` (ridged): ``||R e||^2 = e^T gram e`` plus a
    share of the plain squared error."""
    gram = gram.double()
    gram = gram + damping * torch.trace(gram) / gram.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype)
    return ridged_cholesky(gram).T


def query_roots(w_q: torch.Tensor, b_q: torch.Tensor | None, queries: InputStats, num_heads: int,
                damping: float = 0.0, centre: bool = False) -> list[torch.Tensor]:
    """Per head ``h``, the upper ``R_h`` with ``R_h^T R_h = E[q_h q_h^T]`` for ``q = W_q x + b_q`` over the query
    inputs (their covariance with ``centre``): ``||R_h e||^2 = E[(q_h . e)^2]``, the squared error a key error
    ``e`` causes in head ``h``'s scores."""
    d = w_q.shape[0]
    hd = d // num_heads
    w_q = w_q.double().cpu()
    b_q = torch.zeros(d, dtype=torch.float64) if b_q is None else b_q.double().cpu()
    wq_aug = torch.cat([w_q, b_q[:, None]], dim=1)  # q = [W_q b] [x; 1]
    n_in = queries.gram.shape[0]
    aug = torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64)
    aug[:n_in, :n_in], aug[:n_in, n_in], aug[n_in, :n_in], aug[n_in, n_in] = (queries.gram, queries.total,
                                                                              queries.total, queries.n)
    second = wq_aug @ aug @ wq_aug.T / queries.n  # E[q q^T], [d, d]
    if centre:
        mean_q = wq_aug @ torch.cat([queries.total, torch.tensor([float(queries.n)], dtype=torch.float64)])
        second = second - torch.outer(mean_q, mean_q) / queries.n ** 2
    return [_upper_root(second[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd], damping) for h in range(num_heads)]


def attention_weight(w: torch.Tensor, inputs: InputStats, w_q: torch.Tensor, b_q: torch.Tensor | None,
                     queries: InputStats, w_o: torch.Tensor, num_heads: int, damping: float = 0.0,
                     centre_queries: bool = False, weight_values: bool = True, balance: bool = True
                     ) -> torch.Tensor:
    """The attention-aware, balanced output weight ``G = diag(a_k G_k, a_v G_v)`` (``2d x 2d``, upper).

    - ``G_k``: per head, ``R_h^T R_h = E[q_h q_h^T]`` (the query second moment on calibration data), so
      ``||G_k e_k||^2 = sum_h E[(q_h . e_{k,h})^2]``, the squared error of the attention scores ``q . k``;
    - ``G_v``: ``R^T R = W_o^T W_o``, so ``||G_v e_v|| = ||W_o e_v||``, the error after the output projection;
    - ``damping`` adds that share of each Gram's mean eigenvalue to it: directions the calibration queries (or
      ``W_o``) barely use still count, so the factorisation does not rely on them staying unused on new data;
    - ``a_k``, ``a_v`` scale each block to unit total energy on the (centred) inputs, so K and V compete for
      the rank by relative error, not by scale.

    ``centre_queries`` uses the queries' covariance instead of their second moment (the mean query's scores
    only set a static attention profile); ``weight_values=False`` takes ``G_v = I``; ``balance=False`` keeps K
    and V at their natural scale (``G_k`` then normalised to keep K's plain energy).
    """
    d = w.shape[1]
    g_k = torch.block_diag(*query_roots(w_q, b_q, queries, num_heads, damping, centre_queries))
    eye = torch.eye(d, dtype=torch.float64)
    g_v = _upper_root(w_o.double().cpu().T @ w_o.double().cpu(), damping) if weight_values else eye
    cov = inputs.centred()
    w = w.double().cpu()
    blocks = []
    for g, part in ((g_k, w[:d]), (g_v, w[d:])):
        energy = torch.trace(g @ part @ cov @ part.T @ g.T).clamp_min(1e-30)
        plain = torch.trace(part @ cov @ part.T) if not balance else 1.0
        blocks.append(g * (plain / energy) ** 0.5)
    return torch.block_diag(*blocks)


def kv_error(w: torch.Tensor, b: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor,
             b_new: torch.Tensor | None, stats: InputStats, g: torch.Tensor | None = None) -> float:
    """``||G_k (K - K')||^2`` on centred inputs plus ``||G_v (V - V')||^2`` with the biases, summed over the
    calibration tokens (see the module docstring); ``g`` the block-diagonal ``2d x 2d`` weight (``None``:
    unweighted)."""
    w = w.double().cpu()
    d = w.shape[1]
    g = torch.eye(2 * d, dtype=torch.float64) if g is None else g.double()
    gk, gv = g[:d, :d], g[d:, d:]
    dk = gk @ (w[:d] - up[:d].double() @ down.double())
    dv = gv @ (w[d:] - up[d:].double() @ down.double())
    err = torch.trace(dk @ stats.centred() @ dk.T)
    db = torch.zeros(d, dtype=torch.float64)
    if b is not None:
        db = db + b.double()
    if b_new is not None:
        db = db - b_new.double()
    e = gv @ db
    err = err + torch.trace(dv @ stats.gram @ dv.T) + 2 * e @ dv @ stats.total + stats.n * e @ e
    return float(err)


def refit_up(w: torch.Tensor, b: torch.Tensor | None, down: torch.Tensor, stats: InputStats
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form least-squares up-projections for a fixed ``down`` (SVD-LLM's update), on the calibration
    inputs: ``A_k = argmin ||(X - mu) (W_k - A_k D)^T||`` and ``[A_v, b'] = argmin ||X W_v^T + b - X D^T A_v^T
    - b'||``. Normal equations: ``A_k = W_k C D^T (D C D^T)^-1`` (``C`` the centred Gram); V's free bias makes
    its problem a centred one too: the same formula, and ``b' = b + (W_v - A_v D) mu``. Returns ``(A [2d x r],
    b' [d])``; it minimises :func:`kv_error` under every block-diagonal weight, so it never increases it."""
    w, down = w.double().cpu(), down.double().cpu()
    d = w.shape[1]
    up = least_squares_up(w, down, stats.centred())  # [2d, r]: K and V share the normal equations
    bias = torch.zeros(d, dtype=torch.float64) if b is None else b.double().cpu()
    bias = bias + (w[d:] - up[d:] @ down) @ stats.mean  # a free bias fits V on centred inputs
    return up, bias


def least_squares_up(w: torch.Tensor, down: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``A = argmin ||X (W - A D)^T||`` for inputs with Gram ``X^T X = gram``: ``W gram D^T (D gram D^T)^-1``
    (``len(w) x r``; every row of ``W`` is its own problem, so any invertible row-block weight gives the same
    ``A``)."""
    w, down = w.double().cpu(), down.double().cpu()
    lhs = down @ gram @ down.T
    ridge = SOLVE_RIDGE * torch.trace(lhs) / down.shape[0] * torch.eye(down.shape[0], dtype=torch.float64)
    return torch.linalg.solve(lhs + ridge, down @ gram @ w.T).T


def allocate_ranks(spectra: Sequence[torch.Tensor], total: int, minimum: int = 1) -> list[int]:
    """Ranks ``r_i`` with ``sum r_i == total`` minimising ``sum_i err_i(r_i)``, where ``err_i(r) =
    sum(e_i[r:]) / sum(e_i)`` for descending energies ``e_i`` (each slot's relative error as a function of its
    rank). The marginal gain of a slot's next rank is its next normalised energy, non-increasing, so the greedy
    choice (water-filling: the ``total`` largest normalised energies overall, after ``minimum`` each) is
    optimal."""
    sizes = [len(e) for e in spectra]
    if not minimum * len(sizes) <= total <= sum(sizes):
        raise ValueError(f"a total rank of {total} cannot be split over {len(sizes)} slots of at most "
                         f"{sizes} (at least {minimum} each)")
    ranks = [minimum] * len(sizes)
    gains = []
    for i, e in enumerate(spectra):
        e = e.double() / e.double().sum().clamp_min(1e-300)
        gains += [(float(e[j]), -i, j) for j in range(minimum, len(e))]
    gains.sort(reverse=True)
    for _, neg_i, _ in gains[:total - minimum * len(sizes)]:
        ranks[-neg_i] += 1
    return ranks


def procrustes(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``R`` minimising ``||source R - target||_F`` (``R = U V^T`` from ``source^T target = U S
    V^T``)."""
    u, _, vh = torch.linalg.svd(source.double().T @ target.double())
    return u @ vh


def align_heads(features: Sequence[torch.Tensor], iterations: int = 3) -> list[torch.Tensor]:
    """Generalised Procrustes: rotations ``R_h`` making every head's features ``F_h R_h`` (``tokens x hd``)
    close to their common mean; the first head's frame is kept (``R_0`` starts at the identity)."""
    rotations = [torch.eye(features[0].shape[1], dtype=torch.float64) for _ in features]
    target = features[0].double()
    for _ in range(iterations):
        rotations = [procrustes(f, target) for f in features]
        target = torch.stack([f.double() @ r for f, r in zip(features, rotations)]).mean(0)
    return rotations
