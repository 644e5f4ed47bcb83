"""The ``mla`` plugin: latent-only cache, exact at full rank, activation-aware init, absorbed decoding."""

from __future__ import annotations

import pytest
import torch

from mla_registry.errors import KwargError
from mla_registry.families import whisper
from mla_registry.plugins.mla import MlaBuilder, MultiHeadLatentAttention

RANK = 16


def mla(fresh, h, context, **kwargs):
    return h.swap(fresh(), MlaBuilder(), context=context, **{"rank": RANK, **kwargs})


def set_absorb(model, value: bool) -> None:
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.absorb = value


@pytest.mark.parametrize("init", ["svd", "activation"])
def test_full_rank_is_mha(stock, fresh, context, features, decoder_ids, h, init):
    model = mla(fresh, h, context, rank=h.D_MODEL, init=init)
    for absorb in (False, True):
        set_absorb(model, absorb)
        torch.testing.assert_close(h.logits(model, features, decoder_ids),
                                   h.logits(stock, features, decoder_ids), atol=1e-4, rtol=0)
        assert torch.equal(h.greedy(model, features), h.greedy(stock, features))
    assert torch.equal(h.greedy(model, features, num_beams=3), h.greedy(stock, features, num_beams=3))


def test_absorbed_matches_expanded(fresh, context, features, decoder_ids, h, monkeypatch):
    model = mla(fresh, h, context)
    calls = []
    original = MultiHeadLatentAttention._absorbed
    monkeypatch.setattr(MultiHeadLatentAttention, "_absorbed",
                        lambda self, *a: calls.append(1) or original(self, *a))
    absorbed = h.logits(model, features, decoder_ids, use_cache=True)
    assert len(calls) == 4  # decoder self + cross, two layers (the encoder has no cache: expanded)
    greedy, beams = h.greedy(model, features), h.greedy(model, features, num_beams=3)
    set_absorb(model, False)
    calls.clear()
    expanded = h.logits(model, features, decoder_ids, use_cache=True)
    assert not calls
    torch.testing.assert_close(absorbed, expanded, atol=5e-5, rtol=0)
    assert torch.equal(greedy, h.greedy(model, features))
    assert torch.equal(beams, h.greedy(model, features, num_beams=3))


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


def reconstruction_error(stock, model, context, slot) -> float:
    """Relative Frobenius error of the K/V activations on the slot's calibration inputs."""
    x = context.inputs[slot.path].double()
    old, new = stock.get_submodule(slot.path), model.get_submodule(slot.path)
    w = torch.cat([old.k_proj.weight, old.v_proj.weight]).double()
    w_new = torch.cat([new.k_up.weight, new.v_up.weight]).double() @ new.kv_down.weight.double()
    return ((x @ (w - w_new).T).norm() / (x @ w.T).norm()).item()


def test_activation_init_reconstructs_better_than_svd(stock, fresh, context, h):
    svd, act = mla(fresh, h, None, init="svd"), mla(fresh, h, context)
    for slot in whisper.slots(stock):
        e_svd, e_act = (reconstruction_error(stock, m, context, slot) for m in (svd, act))
        assert e_act < e_svd, f"{slot.name}: activation {e_act:.4f} >= svd {e_svd:.4f}"


def test_calibration_kwargs_reach_the_context(stock, fresh, h):
    ctx = h.CapturedContext(stock)
    mla(fresh, h, ctx, calibration="local:/tmp/x", calibration_size=3)
    assert len(ctx.calls) == len(whisper.slots(stock))
    assert {(data, size) for _, data, size in ctx.calls} == {("local:/tmp/x", 3)}


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
    for which in ("self", "cross"):
        measured, claimed = h.cache_bytes(model, features, which)
        assert measured == claimed == 2 * RANK * 4  # two layers, rank fp32 values per token


def test_causal_in_training_without_mask(fresh, context, features, decoder_ids, h):
    h.assert_causal(mla(fresh, h, context), features, decoder_ids)


def test_build_and_strict_load_roundtrip(fresh, context, features, decoder_ids, h):
    model = mla(fresh, h, context)
    module = model.model.decoder.layers[0].encoder_attn
    assert set(module.state_dict()) == {"q_proj.weight", "q_proj.bias", "kv_down.weight", "k_up.weight",
                                        "v_up.weight", "v_up.bias", "out_proj.weight", "out_proj.bias"}
    assert MlaBuilder().build_kwargs(MlaBuilder().validate({"rank": RANK})) == {"rank": RANK, "absorb": True}
    h.assert_roundtrip(MlaBuilder(), model, features, decoder_ids, rank=RANK)


def test_backward(fresh, context, features, decoder_ids, h):
    model = mla(fresh, h, context)
    names = ("kv_down.weight", "k_up.weight", "v_up.weight", "v_up.bias")
    h.assert_backward(model, features, decoder_ids, names)


def test_bf16_forward(fresh, context, features, decoder_ids, h):
    model = mla(fresh, h, context).to(torch.bfloat16)
    out = h.logits(model, features.to(torch.bfloat16), decoder_ids, use_cache=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    h.greedy(model, features.to(torch.bfloat16))
    assert model.model.decoder.layers[0].self_attn.kv_cache_bytes_per_token() == RANK * 2


def test_kwarg_errors(stock):
    builder, slot = MlaBuilder(), whisper.slots(stock)[0]
    with pytest.raises(KwargError, match="'rank' is required"):
        builder.validate({})
    with pytest.raises(KwargError, match="'init'.*allowed values: activation, svd"):
        builder.validate({"rank": 8, "init": "pca"})
    with pytest.raises(KwargError, match=r"'rank'=65; allowed values: 1\.\.64"):
        builder.check_slot(slot, builder.validate({"rank": 65}))
    with pytest.raises(KwargError, match="calibration"):
        builder.convert(stock.get_submodule(slot.path), slot, None, rank=8)


@pytest.mark.cuda
def test_cuda_absorbed_and_fused(stock, fresh, context, features, decoder_ids, h):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    reference = fresh().cuda()
    full = mla(fresh, h, context, rank=h.D_MODEL).cuda()
    f = features.cuda()
    ids = decoder_ids.cuda()
    torch.testing.assert_close(h.logits(full, f, ids), h.logits(reference, f, ids), atol=2e-4, rtol=0)
    model = mla(fresh, h, context).cuda()
    absorbed = h.logits(model, f, ids, use_cache=True)
    set_absorb(model, False)
    torch.testing.assert_close(absorbed, h.logits(model, f, ids, use_cache=True), atol=2e-4, rtol=0)
    half = mla(fresh, h, context).cuda().to(torch.bfloat16)
    assert torch.isfinite(h.logits(half, f.to(torch.bfloat16), ids)).all()
    h.greedy(half, f.to(torch.bfloat16), num_beams=3)
