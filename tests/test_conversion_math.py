"""The conversion maths on small random cases: exact at full rank, least squares never worse, the weighted
objective better on its own metric, budgets met exactly, Procrustes recovering rotations."""

from __future__ import annotations

import pytest
import torch

from mla_registry import conversion_math as cm

D, HEADS = 12, 3


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    x = x + 3.0  # a large shared mean, as encoder outputs have
    xq = torch.randn(300, D, generator=g, dtype=torch.float64)
    w = torch.randn(2 * D, D, generator=g, dtype=torch.float64)
    w[:D] *= 5.0  # K at another scale than V
    return dict(x=x, xq=xq, w=w, b=torch.randn(D, generator=g, dtype=torch.float64),
                w_q=torch.randn(D, D, generator=g, dtype=torch.float64), b_q=torch.randn(D, generator=g,
                                                                                       dtype=torch.float64),
                w_o=torch.randn(D, D, generator=g, dtype=torch.float64))


def weight(case):
    return cm.attention_weight(case["w"], cm.InputStats.of(case["x"]), case["w_q"], case["b_q"],
                               cm.InputStats.of(case["xq"]), case["w_o"], HEADS)


def direct_error(case, up, down, b_new, g):
    """kv_error computed from the activations themselves (centred K, V with biases)."""
    x, w, b = case["x"], case["w"], case["b"]
    k, k2 = x @ w[:D].T, x @ (up[:D] @ down).T
    ek = (k - k2) - (k - k2).mean(0)
    ev = x @ w[D:].T + b - (x @ (up[D:] @ down).T + b_new)
    return float(((ek @ g[:D, :D].T) ** 2).sum() + ((ev @ g[D:, D:].T) ** 2).sum())


def test_kv_error_matches_the_activations(case):
    stats, g = cm.InputStats.of(case["x"]), weight(case)
    up, down = cm.spectrum(case["w"]).factors(case["w"], 5)
    got = cm.kv_error(case["w"], case["b"], up, down, case["b"] * 0.5, stats, g)
    assert got == pytest.approx(direct_error(case, up, down, case["b"] * 0.5, g), rel=1e-9)


@pytest.mark.parametrize("objective", ["svd", "activation", "attention"])
def test_full_rank_reproduces_the_original(case, objective):
    stats = cm.InputStats.of(case["x"])
    spec = {"svd": lambda: cm.spectrum(case["w"]), "activation": lambda: cm.spectrum(case["w"], stats.gram),
            "attention": lambda: cm.spectrum(case["w"], stats.centred(), weight(case))}[objective]()
    up, down = spec.factors(case["w"], D)
    torch.testing.assert_close(up @ down, case["w"], atol=1e-8, rtol=0)
    up, bias = cm.refit_up(case["w"], case["b"], down, stats)
    torch.testing.assert_close(up @ down, case["w"], atol=1e-5, rtol=0)
    torch.testing.assert_close(bias, case["b"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [1, 3, 6, 9])
def test_least_squares_refit_never_increases_the_calibration_error(case, rank):
    stats, g = cm.InputStats.of(case["x"]), weight(case)
    for spec in (cm.spectrum(case["w"]), cm.spectrum(case["w"], stats.gram),
                 cm.spectrum(case["w"], stats.centred(), g)):
        up, down = spec.factors(case["w"], rank)
        new_up, new_b = cm.refit_up(case["w"], case["b"], down, stats)
        for metric in (None, g):
            before = cm.kv_error(case["w"], case["b"], up, down, case["b"], stats, metric)
            after = cm.kv_error(case["w"], case["b"], new_up, down, new_b, stats, metric)
            assert after <= before * (1 + 1e-9)
    # the unweighted bases gain strictly (the mean of the inputs is fitted by the bias, K's is ignored)
    up, down = cm.spectrum(case["w"], stats.gram).factors(case["w"], rank)
    new_up, new_b = cm.refit_up(case["w"], case["b"], down, stats)
    assert (cm.kv_error(case["w"], case["b"], new_up, down, new_b, stats)
            < cm.kv_error(case["w"], case["b"], up, down, case["b"], stats))


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_weighted_objective_beats_unweighted_on_the_weighted_metric(case, rank):
    stats, g = cm.InputStats.of(case["x"]), weight(case)
    errors = {}
    for name, spec in (("activation", cm.spectrum(case["w"], stats.gram)),
                       ("attention", cm.spectrum(case["w"], stats.centred(), g))):
        up, down = spec.factors(case["w"], rank)
        up, bias = cm.refit_up(case["w"], case["b"], down, stats)
        errors[name] = cm.kv_error(case["w"], case["b"], up, down, bias, stats, g)
    assert errors["attention"] < errors["activation"]
    # and the spectrum predicts the weighted error it reaches (up to the ridge)
    spec = cm.spectrum(case["w"], stats.centred(), g)
    up, down = spec.factors(case["w"], rank)
    up, bias = cm.refit_up(case["w"], case["b"], down, stats)
    assert errors["attention"] == pytest.approx(float(spec.energy[rank:].sum()), rel=1e-4)


def test_attention_weight_measures_score_and_output_errors(case):
    """||G_k e||^2 is the mean squared score error over the queries (up to the balance factor); ||G_v e|| is
    ||W_o e||."""
    g = weight(case)
    e = torch.randn(D, dtype=torch.float64)
    q = case["xq"] @ case["w_q"].T + case["b_q"]
    hd = D // HEADS
    scores = sum(((q[:, h * hd:(h + 1) * hd] @ e[h * hd:(h + 1) * hd]) ** 2).mean() for h in range(HEADS))
    gk, gv = g[:D, :D], g[D:, D:]
    ratio_k = float((gk @ e).square().sum() / scores)
    ratio_v = float((gv @ e).square().sum() / (case["w_o"] @ e).square().sum())
    e2 = torch.randn(D, dtype=torch.float64)
    scores2 = sum(((q[:, h * hd:(h + 1) * hd] @ e2[h * hd:(h + 1) * hd]) ** 2).mean() for h in range(HEADS))
    assert float((gk @ e2).square().sum() / scores2) == pytest.approx(ratio_k, rel=1e-4)
    assert float((gv @ e2).square().sum() / (case["w_o"] @ e2).square().sum()) == pytest.approx(ratio_v, rel=1e-4)
    # balanced: each block carries unit energy on the centred inputs
    cov = cm.InputStats.of(case["x"]).centred()
    for blk, part in ((gk, case["w"][:D]), (gv, case["w"][D:])):
        assert float(torch.trace(blk @ part @ cov @ part.T @ blk.T)) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("total", [4, 10, 23, 36])
def test_allocated_ranks_meet_the_budget_exactly_and_are_optimal(total):
    g = torch.Generator().manual_seed(3)
    spectra = [torch.sort(torch.rand(12, generator=g) ** p, descending=True).values for p in (1, 3, 8)]
    ranks = cm.allocate_ranks(spectra, total)
    assert sum(ranks) == total and all(1 <= r <= 12 for r in ranks)

    def cost(rs):
        return sum(float(e[r:].sum() / e.sum()) for e, r in zip(spectra, rs))

    best = min(cost((a, b, total - a - b)) for a in range(1, 13) for b in range(1, 13) if 1 <= total - a - b <= 12)
    assert cost(ranks) == pytest.approx(best, abs=1e-12)


def test_allocation_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="cannot be split"):
        cm.allocate_ranks([torch.ones(4), torch.ones(4)], 9)


def test_procrustes_recovers_a_rotation():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(50, 4, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    rotations = cm.align_heads([f, f @ q, f @ q.T])
    aligned = [x @ r for x, r in zip([f, f @ q, f @ q.T], rotations)]
    for a in aligned[1:]:
        torch.testing.assert_close(a, aligned[0], atol=1e-9, rtol=0)
    for r in rotations:
        torch.testing.assert_close(r.T @ r, torch.eye(4, dtype=torch.float64), atol=1e-9, rtol=0)


def test_score_only_weight_uses_the_query_covariance_and_plain_values(case):
    stats = cm.InputStats.of(case["x"])
    g = cm.attention_weight(case["w"], stats, case["w_q"], case["b_q"], cm.InputStats.of(case["xq"]), case["w_o"],
                            HEADS, centre_queries=True, weight_values=False, balance=False)
    q = case["xq"] @ case["w_q"].T + case["b_q"]
    q = q - q.mean(0)
    hd = D // HEADS
    ratios = []
    for seed in (1, 2):
        e = torch.randn(D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        var = sum(((q[:, h * hd:(h + 1) * hd] @ e[h * hd:(h + 1) * hd]) ** 2).mean() for h in range(HEADS))
        ratios.append(float((g[:D, :D] @ e).square().sum() / var))
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-4)
    torch.testing.assert_close(g[D:, D:], torch.eye(D, dtype=torch.float64))
    cov = stats.centred()  # K keeps its plain energy: no rebalancing against V
    k = case["w"][:D]
    assert float(torch.trace(g[:D, :D] @ k @ cov @ k.T @ g[:D, :D].T)) == pytest.approx(
        float(torch.trace(k @ cov @ k.T)), rel=1e-9)
