"""The ``mha`` plugin re-implements Whisper's attention exactly (and the shared machinery is right)."""

from __future__ import annotations

import pytest
import torch

from mla_registry.attention import attend, causal_mask
from mla_registry.plugins.mha import MhaBuilder, MultiHeadAttention


@pytest.fixture
def converted(fresh, h):
    return h.swap(fresh(), MhaBuilder())


def test_module_interface(converted):
    module = converted.model.decoder.layers[1].self_attn
    assert isinstance(module, MultiHeadAttention)
    facts = (module.layer_idx, module.is_causal, module.embed_dim, module.num_heads, module.head_dim)
    assert facts == (1, True, 64, 4, 16)
    assert converted.model.encoder.layers[0].self_attn.is_causal is False
    assert set(module.state_dict()) == {"q_proj.weight", "q_proj.bias", "k_proj.weight", "v_proj.weight",
                                        "v_proj.bias", "out_proj.weight", "out_proj.bias"}


def test_generate_identical_to_stock(stock, converted, features, h):
    greedy = h.greedy(stock, features)
    assert len(set(greedy.flatten().tolist())) > 3  # the tiny model's outputs are not degenerate
    assert torch.equal(h.greedy(converted, features), greedy)
    assert torch.equal(h.greedy(converted, features, num_beams=3), h.greedy(stock, features, num_beams=3))


def test_teacher_forced_logits_equal(stock, converted, features, decoder_ids, h):
    ref = h.logits(stock, features, decoder_ids)
    torch.testing.assert_close(h.logits(converted, features, decoder_ids), ref, atol=1e-5, rtol=0)
    out = h.logits(converted, features, decoder_ids, output_attentions=True)  # explicit-softmax path
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)


def test_causal_in_training_without_mask(converted, features, decoder_ids, h):
    h.assert_causal(converted, features, decoder_ids)


def test_attend_bottom_right_causal_with_cached_prefix():
    """q > 1 new tokens after a cached prefix, no mask: the rows equal full causal attention's last rows."""
    class Causal(torch.nn.Module):
        is_causal, dropout, training = True, 0.0, False

        def dropout_p(self) -> float:
            return 0.0

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    full, _ = attend(Causal(), q, k, v, None)
    tail, _ = attend(Causal(), q[:, :, 4:], k, v, None)
    torch.testing.assert_close(tail, full[:, :, 4:])
    assert causal_mask(2, 4, torch.device("cpu")).tolist() == [[True, True, True, False], [True] * 4]


def test_build_and_strict_load_roundtrip(converted, features, decoder_ids, h):
    h.assert_roundtrip(MhaBuilder(), converted, features, decoder_ids)


def test_cache_bytes_measured(converted, features, h):
    measured, claimed = h.cache_bytes(converted, features, "self")
    assert measured == claimed == 2 * 2 * 64 * 4  # two layers, K+V, d_model 64, fp32
    measured, claimed = h.cache_bytes(converted, features, "cross")
    assert measured == claimed == 2 * 2 * 64 * 4


def test_backward(converted, decoder_ids, features, h):
    h.assert_backward(converted, features, decoder_ids, ("q_proj.weight", "k_proj.weight", "v_proj.weight"))


def test_bf16_forward_and_generate(converted, features, decoder_ids, h):
    model = converted.to(torch.bfloat16)
    out = h.logits(model, features.to(torch.bfloat16), decoder_ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    h.greedy(model, features.to(torch.bfloat16))
    assert model.model.decoder.layers[0].self_attn.kv_cache_bytes_per_token() == 2 * 64 * 2


def test_no_kwargs():
    assert MhaBuilder().validate({}) == {}


def test_builtin_plugins_register_through_the_hook():
    import pluggy

    from mla_registry import hookspecs
    from mla_registry.plugins import gqa, mha, mla

    pm = pluggy.PluginManager("mla_registry")
    pm.add_hookspecs(hookspecs)
    for plugin in (mha, gqa, mla):
        pm.register(plugin)
    builders = []
    pm.hook.register_attention(register=builders.append)
    assert sorted((b.name, b.version) for b in builders) == [("gqa", "1"), ("mha", "1"), ("mla", "1")]
    assert all(b.description and all(k.help for k in b.kwargs) for b in builders)
