"""The ``mha`` plugin re-implements Whisper's attention exactly (the generic contract is in test_conformance)."""

from __future__ import annotations

import pytest
import torch

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


def test_teacher_forced_logits_equal_including_the_explicit_softmax_path(stock, converted, features,
                                                                          decoder_ids, h):
    ref = h.logits(stock, features, decoder_ids)
    torch.testing.assert_close(h.logits(converted, features, decoder_ids), ref, atol=1e-5, rtol=0)
    out = h.logits(converted, features, decoder_ids, output_attentions=True)  # explicit-softmax path
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)


def test_cache_bytes_are_k_and_v_of_every_head(converted):
    assert converted.model.decoder.layers[0].self_attn.kv_cache_bytes_per_token() == 2 * 64 * 4
    assert converted.to(torch.bfloat16).model.decoder.layers[0].self_attn.kv_cache_bytes_per_token() == 2 * 64 * 2


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
    assert sorted((b.name, b.version) for b in builders) == [("gqa", "2"), ("mha", "1"), ("mla", "2")]
    assert all(b.description and all(k.help for k in b.kwargs) for b in builders)
