"""The ``mla`` plugin: latent-only cache, activation-aware init, absorbed decoding that reads the weights in
place (the generic contract, incl. full rank = MHA and absorbed = re-expanded, is in test_conformance)."""

from __future__ import annotations

import pytest
import torch

from mla_registry import whisper
from mla_registry.errors import KwargError
from mla_registry.plugins.mla import MlaBuilder, MultiHeadLatentAttention

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
    assert builder.build_kwargs(builder.validate({"rank": RANK})) == {"rank": RANK, "absorb": True}


def test_kwarg_errors(stock):
    builder, slot = MlaBuilder(), whisper.slots(stock)[0]
    with pytest.raises(KwargError, match="'rank' is required"):
        builder.validate({})
    with pytest.raises(KwargError, match="'init'.*allowed values: activation, svd"):
        builder.validate({"rank": 8, "init": "pca"})
    with pytest.raises(KwargError, match=r"'rank'=65; allowed values: 1\.\.64"):
        builder.check_slot(slot, builder.validate({"rank": 65}))
    with pytest.raises(KwargError, match="calibration"):
        builder.convert(stock.get_submodule(slot.path), slot, None, **builder.validate({"rank": 8}))
    with pytest.raises(KwargError, match="unknown kwarg.*calibration_size"):  # one knob: the conversion's
        builder.validate({"rank": 8, "calibration_size": 64})
