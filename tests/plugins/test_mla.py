"""The ``mla`` plugin: latent-only cache, activation-aware init, absorbed decoding that reads the weights in
place (the generic contract, incl. full rank = MHA and absorbed = re-expanded, is in test_conformance)."""

from __future__ import annotations

import pytest
import torch

from mla_registry import whisper
from mla_registry.errors import KwargError
from mla_registry.plugins.mla import V_WEIGHTS, MlaBuilder, MultiHeadLatentAttention

RANK = 16


def mla(fresh, h, context, **kwargs):
    return h.swap(fresh(), MlaBuilder(), context=context, **{"rank": RANK, **kwargs})


def set_absorb(model, value: bool) -> None:
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.absorb = value


def forced(model, features, steps: int = 10) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(features, min_new_tokens=steps, max_new_tokens=steps)


def test_absorbed_path_runs_exactly_when_decoding_with_a_cache(fresh, context, features, decoder_ids, h,
                                                              monkeypatch):
    model = mla(fresh, h, context)
    calls = []
    original = MultiHeadLatentAttention._absorbed
    monkeypatch.setattr(MultiHeadLatentAttention, "_absorbed",
                        lambda self, *a: calls.append(1) or original(self, *a))
    absorbed = h.logits(model, features, decoder_ids, use_cache=True)
    assert len(calls) == 4  # decoder self + cross, two layers (the encoder has no cache: expanded)
    tokens = forced(model, features)
    set_absorb(model, False)
    calls.clear()
    expanded = h.logits(model, features, decoder_ids, use_cache=True)
    assert not calls
    torch.testing.assert_close(absorbed, expanded, atol=5e-5, rtol=0)
    assert torch.equal(tokens, forced(model, features))


def test_absorbed_follows_weight_updates(fresh, context, features, decoder_ids, h):
    """Nothing derived goes stale: after an in-place weight change both paths still agree."""
    model = mla(fresh, h, context)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MultiHeadLatentAttention):
                module.k_up.weight.mul_(1.5)
                module.v_up.weight.add_(0.01)
    absorbed = h.logits(model, features, decoder_ids, use_cache=True)
    set_absorb(model, False)
    expanded = h.logits(model, features, decoder_ids, use_cache=True)
    torch.testing.assert_close(absorbed, expanded, atol=5e-5, rtol=0)


def test_absorbed_batch_of_one_equals_batched(fresh, context, features, h):
    """The head-batched absorption mixes no rows of different samples."""
    model = mla(fresh, h, context)
    batched = forced(model, features)
    for i in range(features.shape[0]):
        assert torch.equal(forced(model, features[i:i + 1]), batched[i:i + 1])


def reconstruction_error(stock, model, context, slot) -> float:
    """Relative Frobenius error of the K/V activations on the slot's calibration inputs."""
    x = context.calibration_inputs(slot).double()
    old, new = stock.get_submodule(slot.path), model.get_submodule(slot.path)
    w = torch.cat([old.k_proj.weight, old.v_proj.weight]).double()
    w_new = torch.cat([new.k_up.weight, new.v_up.weight]).double() @ new.kv_down.weight.double()
    return ((x @ (w - w_new).T).norm() / (x @ w.T).norm()).item()


def test_activation_init_reconstructs_better_than_svd(stock, fresh, context, h):
    svd, act = mla(fresh, h, None, init="svd"), mla(fresh, h, context)
    for slot in whisper.slots(stock):
        e_svd, e_act = (reconstruction_error(stock, m, context, slot) for m in (svd, act))
        assert e_act < e_svd, f"{slot.name}: activation {e_act:.4f} >= svd {e_svd:.4f}"


class CountingContext:
    """Calibration inputs from another context, counting which slots asked."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def calibration_inputs(self, slot):
        self.calls.append(slot.path)
        return self.inner.calibration_inputs(slot)

    def query_inputs(self, slot):
        return self.inner.query_inputs(slot)


def test_activation_init_asks_the_context_for_every_slot_and_svd_for_none(stock, fresh, context, h):
    counting = CountingContext(context)
    mla(fresh, h, counting)
    assert sorted(counting.calls) == sorted(s.path for s in whisper.slots(stock))
    counting.calls.clear()
    mla(fresh, h, counting, init="svd")
    assert counting.calls == []


def test_conversion_is_deterministic(fresh, context, h):
    a, b = mla(fresh, h, context).state_dict(), mla(fresh, h, context).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_latent_only_cache(fresh, context, features, h):
    model = mla(fresh, h, context)
    with torch.no_grad():
        out = model.generate(features, max_new_tokens=4, return_dict_in_generate=True)
    layer = out.past_key_values.self_attention_cache.layers[0]
    assert layer.keys.shape[1:2] + layer.keys.shape[3:] == (1, RANK) and layer.values.shape[-1] == 0
    cross = out.past_key_values.cross_attention_cache.layers[1]
    assert cross.keys.shape == (features.shape[0], 1, h.FRAMES, RANK)


def test_module_parameters_and_build_kwargs(fresh, context, h):
    model = mla(fresh, h, context)
    module = model.model.decoder.layers[0].encoder_attn
    assert set(module.state_dict()) == {"q_proj.weight", "q_proj.bias", "kv_down.weight", "k_up.weight",
                                        "v_up.weight", "v_up.bias", "out_proj.weight", "out_proj.bias"}
    builder = MlaBuilder()
    assert builder.build_kwargs(builder.validate({"rank": RANK})) == {"rank": RANK, "absorb": True, "latent_from": None}


def test_kwarg_errors(stock):
    builder, slot = MlaBuilder(), whisper.slots(stock)[0]
    with pytest.raises(KwargError, match="give kwarg 'rank'.*or 'budget'"):  # one of the two
        builder.check_slot(slot, builder.validate({}))
    with pytest.raises(KwargError, match="'init'.*allowed values: activation, svd, attention"):
        builder.validate({"rank": 8, "init": "pca"})
    with pytest.raises(KwargError, match=r"'rank'=65; allowed values: 1\.\.64"):
        builder.check_slot(slot, builder.validate({"rank": 65}))
    with pytest.raises(KwargError, match="calibration"):
        builder.convert(stock.get_submodule(slot.path), slot, None, **builder.validate({"rank": 8}))
    with pytest.raises(KwargError, match="unknown kwarg.*calibration_size"):  # one knob: the conversion's
        builder.validate({"rank": 8, "calibration_size": 64})


def kv_error(stock, model, context, slot, g=None) -> float:
    """:func:`conversion_math.kv_error` of the converted slot (centred K, V with its bias)."""
    from mla_registry import conversion_math as cm

    old, new = stock.get_submodule(slot.path), model.get_submodule(slot.path)
    w = torch.cat([old.k_proj.weight, old.v_proj.weight]).detach()
    up = torch.cat([new.k_up.weight, new.v_up.weight]).detach()
    return cm.kv_error(w, old.v_proj.bias.detach(), up, new.kv_down.weight.detach(), new.v_up.bias.detach(),
                       cm.InputStats.of(context.calibration_inputs(slot)), g)


@pytest.mark.parametrize("init", ["svd", "activation"])
def test_refit_never_increases_the_calibration_error(stock, fresh, context, h, init):
    plain, refit = mla(fresh, h, context, init=init), mla(fresh, h, context, init=init, refit=True)
    for slot in whisper.slots(stock):
        assert kv_error(stock, refit, context, slot) <= kv_error(stock, plain, context, slot) * (1 + 1e-6)


def test_attention_init_is_best_on_its_own_objective(stock, fresh, context, h):
    from mla_registry import conversion_math as cm

    att, act = mla(fresh, h, context, init="attention"), mla(fresh, h, context, init="activation", refit=True)
    for slot in whisper.slots(stock):
        old = stock.get_submodule(slot.path)
        w = torch.cat([old.k_proj.weight, old.v_proj.weight]).detach()
        g = cm.attention_weight(w, cm.InputStats.of(context.calibration_inputs(slot)), old.q_proj.weight.detach(),
                                old.q_proj.bias.detach(), cm.InputStats.of(context.query_inputs(slot)),
                                old.out_proj.weight.detach(), slot.num_heads)
        assert kv_error(stock, att, context, slot, g) < kv_error(stock, act, context, slot, g), slot.name


def output_error(stock, model, context, slot) -> float:
    """Relative attention-output error of the converted slot against the original on the calibration probe."""
    from mla_registry import head_grouping as hg

    old, new = stock.get_submodule(slot.path), model.get_submodule(slot.path)
    d = slot.embed_dim
    kv = torch.cat([new.k_up.weight, new.v_up.weight]).detach().double() @ new.kv_down.weight.detach().double()
    probe = hg.Probe.of(context.query_inputs(slot), context.calibration_inputs(slot), slot.is_cross)
    return hg.output_error(hg.HeadWeights.of(old, slot.num_heads), hg.contiguous(slot.num_heads, slot.num_heads),
                           probe, lambda w, _g: (w, kv[:d], kv[d:], new.v_up.bias.detach().double()))


def test_output_init_errs_no_more_than_scores_on_the_attention_output(stock, fresh, context, h):
    from mla_registry import lineage

    out, scores = mla(fresh, h, context, init="output"), mla(fresh, h, context, init="scores")
    weights = {r.path: r.convert_kwargs["v_weight"] for r in lineage.of(out).slots}
    assert set(weights.values()) <= set(V_WEIGHTS)
    for slot in whisper.slots(stock):
        err_out, err_scores = output_error(stock, out, context, slot), output_error(stock, scores, context, slot)
        assert err_out <= err_scores * (1 + 1e-6), slot.name
        if weights[slot.path] != 1.0:  # another weight was chosen because it errs less
            assert err_out < err_scores, slot.name
    # the recorded weight reproduces the conversion: v_weight given explicitly converts to the same module
    slot = whisper.slots(stock)[0]
    again = mla(fresh, h, context, init="output", v_weight=weights[slot.path])
    torch.testing.assert_close(again.get_submodule(slot.path).kv_down.weight,
                               out.get_submodule(slot.path).kv_down.weight)


def test_output_init_converts_slot_by_slot_as_surgery_does(stock, fresh, context, h):
    """The builder contract's convert() without plan(): init='output' chooses the slot's V weight itself, the
    same one plan() records, so the module equals the one surgery builds."""
    from mla_registry import lineage

    builder, slot = MlaBuilder(), whisper.slots(stock)[0]
    kwargs = builder.validate({"rank": RANK, "init": "output"})
    alone = builder.convert(stock.get_submodule(slot.path), slot, context, **kwargs)
    planned = mla(fresh, h, context, init="output")
    record = next(r for r in lineage.of(planned).slots if r.path == slot.path)
    assert record.convert_kwargs["v_weight"] in V_WEIGHTS
    torch.testing.assert_close(alone.kv_down.weight, planned.get_submodule(slot.path).kv_down.weight)


def test_v_weight_errors(stock, fresh, context, h):
    builder, slot = MlaBuilder(), whisper.slots(stock)[0]
    with pytest.raises(KwargError, match="'v_weight' applies to init='output' only"):
        builder.check_slot(slot, builder.validate({"rank": 8, "init": "scores", "v_weight": 2.0}))
    with pytest.raises(KwargError, match="'v_weight'.*must be > 0"):
        builder.validate({"rank": 8, "init": "output", "v_weight": 0.0})


@pytest.mark.parametrize("budget,scope", [(0.25, "kind"), (0.125, "kind"), (0.25, "all")])
def test_budgeted_ranks_meet_the_budget_exactly(stock, fresh, context, h, budget, scope):
    from mla_registry import lineage, surgery

    model = h.swap(fresh(), MlaBuilder(), kinds=("decoder.self", "decoder.cross"), context=context,
                   budget=budget, budget_scope=scope, init="attention")
    records = lineage.of(model).slots
    assert all(r.convert_kwargs["budget"] == budget for r in records)
    groups = {}
    for r in records:
        groups.setdefault(r.kind if scope == "kind" else "all", []).append(r.kwargs["rank"])
    for ranks in groups.values():
        assert sum(ranks) == budget * 2 * h.D_MODEL * len(ranks)
    for r in records:
        assert model.get_submodule(r.path).rank == r.kwargs["rank"]
    label = surgery.describe(model)["decoder.cross"]
    ranks = [r.kwargs["rank"] for r in records if r.kind == "decoder.cross"]
    span = f"{min(ranks)}..{max(ranks)}" if min(ranks) != max(ranks) else str(ranks[0])
    assert label == f"mla(budget 1/{round(1 / budget)}: {span})"


def test_budget_or_rank_is_required(fresh, context, h):
    with pytest.raises(KwargError, match="'rank'.*or 'budget'"):
        mla(fresh, h, context, rank=None)


def test_budget_that_is_not_a_whole_rank_is_refused(fresh, context, h):
    with pytest.raises(KwargError, match="not a whole number"):
        h.swap(fresh(), MlaBuilder(), kinds=("decoder.self",), context=context, budget=0.3)


def shared(fresh, h, context, **kwargs):
    """Decoder self + cross converted, the cross slots sharing one latent."""
    return h.swap(fresh(), MlaBuilder(), kinds=("decoder.self", "decoder.cross"), context=context,
                  share_cross=True, **kwargs)


def test_shared_cross_latent_at_full_width_is_exact_and_cached_once(stock, fresh, context, features, decoder_ids,
                                                                    h):
    from mla_registry import kvcache

    model = shared(fresh, h, context, rank=h.D_MODEL, init="activation")
    torch.testing.assert_close(h.logits(model, features, decoder_ids, use_cache=True),
                               h.logits(stock, features, decoder_ids), atol=2e-4, rtol=0)
    with torch.no_grad():
        out = model.generate(features, max_new_tokens=4, return_dict_in_generate=True)
    cross = out.past_key_values.cross_attention_cache.layers
    assert cross[0].keys.shape == (features.shape[0], 1, h.FRAMES, h.D_MODEL)
    assert cross[1].keys.shape[-1] == 0 and cross[1].values.shape[-1] == 0  # layer 1 reads layer 0's entry
    measured = kvcache.measure(out.past_key_values)
    assert measured.cross_per_frame == h.D_MODEL * 4 == kvcache.declared(model)[1]  # one latent, fp32
    assert torch.equal(h.greedy(model, features), h.greedy(stock, features))


@pytest.mark.parametrize("init", ["activation", "scores"])
def test_shared_cross_latent_reads_the_same_latent_with_and_without_a_cache(fresh, context, features, decoder_ids,
                                                                            h, init):
    model = shared(fresh, h, context, rank=RANK, init=init)
    layers = model.model.decoder.layers
    assert torch.equal(layers[0].encoder_attn.kv_down.weight, layers[1].encoder_attn.kv_down.weight)
    assert [la.encoder_attn.latent_from for la in layers] == [0, 0]
    cached = h.logits(model, features, decoder_ids, use_cache=True)
    torch.testing.assert_close(cached, h.logits(model, features, decoder_ids, use_cache=False), atol=5e-5, rtol=0)
    tokens = forced(model, features)
    set_absorb(model, False)
    assert torch.equal(tokens, forced(model, features))


def test_shared_latent_is_fixed_and_the_budget_gives_it_its_share(stock, fresh, context, h):
    from mla_registry import lineage, surgery
    from mla_registry.finetune import trainable_parameters

    model = shared(fresh, h, context, budget=0.125, init="scores")
    records = {r.path: r for r in lineage.of(model).slots}
    cross = [r for r in records.values() if r.kind == "decoder.cross"]
    selfs = [r for r in records.values() if r.kind == "decoder.self"]
    assert [r.kwargs["rank"] for r in cross] == [0.125 * 2 * h.D_MODEL * 2] * 2  # one latent for both layers
    assert sum(r.kwargs["rank"] for r in selfs) == 0.125 * 2 * h.D_MODEL * 2
    assert surgery.describe(model)["decoder.cross"] == "mla(budget 1/8: 32, latent_from=0)"
    names = set(trainable_parameters(model, "converted"))
    assert not any(n.endswith("encoder_attn.kv_down.weight") for n in names)
    assert any(n.endswith("encoder_attn.k_up.weight") for n in names)
    assert any(n.endswith("self_attn.kv_down.weight") for n in names)


def test_shared_latent_with_output_init_records_one_weight_and_errs_no_more_than_scores(stock, fresh, context, h):
    """share_cross with init='output': one V weight for the shared latent (recorded on every cross slot), chosen
    by the cross slots' summed attention-output error, which is then no larger than that of init='scores'."""
    from mla_registry import lineage

    out = h.swap(fresh(), MlaBuilder(), kinds=("decoder.cross",), context=context, rank=RANK, init="output",
                 share_cross=True)
    scores = h.swap(fresh(), MlaBuilder(), kinds=("decoder.cross",), context=context, rank=RANK, init="scores",
                    share_cross=True)
    weights = {r.convert_kwargs["v_weight"] for r in lineage.of(out).slots if r.kind == "decoder.cross"}
    assert len(weights) == 1 and weights <= set(V_WEIGHTS)
    cross = [s for s in whisper.slots(stock) if s.is_cross]
    err_out = sum(output_error(stock, out, context, s) for s in cross)
    err_scores = sum(output_error(stock, scores, context, s) for s in cross)
    assert err_out <= err_scores * (1 + 1e-6)
    if weights != {1.0}:
        assert err_out < err_scores


def test_shared_latent_errors(stock, fresh, context, h):
    with pytest.raises(KwargError, match="selects no cross-attention slot"):
        h.swap(fresh(), MlaBuilder(), kinds=("decoder.self",), context=context, rank=8, share_cross=True)
    with pytest.raises(KwargError, match="'latent_from' is set by share_cross"):
        h.swap(fresh(), MlaBuilder(), kinds=("decoder.cross",), context=context, rank=8, latent_from=0)
    with pytest.raises(KwargError, match="budget_scope='kind'"):
        shared(fresh, h, context, budget=0.25, budget_scope="all")
    builder, slot = MlaBuilder(), [s for s in whisper.slots(stock) if s.is_cross][0]
    with pytest.raises(KwargError, match="convert through mla_registry.surgery"):
        builder.convert(stock.get_submodule(slot.path), slot, context,
                        **builder.validate({"rank": 8, "latent_from": 0}))
