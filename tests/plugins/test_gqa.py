"""The ``gqa`` plugin: mean-pooled or fitted K/V heads, a cache of ``kv_heads`` heads, folded attention equal to
MHA with the pooled heads repeated (the generic contract is in test_conformance)."""

from __future__ import annotations

import pytest
import torch

from mla_registry import whisper
from mla_registry.errors import KwargError
from mla_registry.plugins.gqa import GqaBuilder, GroupedQueryAttention
from mla_registry.plugins.mha import MhaBuilder


def forced(model, features, steps: int = 10) -> torch.Tensor:
    """Greedy tokens with a forced length (end-of-text suppressed), as bench/decode.py decodes."""
    with torch.no_grad():
        return model.generate(features, min_new_tokens=steps, max_new_tokens=steps)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_equals_mha_with_repeated_heads(fresh, features, decoder_ids, h, kv_heads):
    """GQA (a cache of kv_heads heads, queries folded onto them) computes what MHA computes with every pooled
    K/V head repeated over its group: same logits, same greedy, forced-length and beam-search tokens."""
    model = h.swap(fresh(), GqaBuilder(), kv_heads=kv_heads)
    reference = h.swap(fresh(), MhaBuilder())
    for slot in whisper.slots(model):
        gqa, mha = model.get_submodule(slot.path), reference.get_submodule(slot.path)
        assert isinstance(gqa, GroupedQueryAttention)
        assert gqa.k_proj.weight.shape == (kv_heads * gqa.head_dim, h.D_MODEL)
        rep = gqa.num_key_value_groups
        with torch.no_grad():
            for name in ("k_proj", "v_proj"):
                src, dst = getattr(gqa, name), getattr(mha, name)
                w = src.weight.view(gqa.kv_heads, 1, gqa.head_dim, -1).expand(-1, rep, -1, -1)
                dst.weight.copy_(w.reshape_as(dst.weight))
                if src.bias is not None:
                    dst.bias.copy_(src.bias.view(gqa.kv_heads, 1, -1).expand(-1, rep, -1).reshape(-1))
    for kw in ({}, {"use_cache": True}):
        torch.testing.assert_close(h.logits(model, features, decoder_ids, **kw),
                                   h.logits(reference, features, decoder_ids, **kw), atol=5e-5, rtol=1e-5)
    assert torch.equal(h.greedy(model, features), h.greedy(reference, features))
    assert torch.equal(forced(model, features), forced(reference, features))
    assert torch.equal(h.greedy(model, features, num_beams=3), h.greedy(reference, features, num_beams=3))


def test_heads_are_mean_pooled(stock, fresh, h):
    model = h.swap(fresh(), GqaBuilder(), kv_heads=2)
    orig = stock.model.decoder.layers[1].self_attn
    new = model.model.decoder.layers[1].self_attn
    hd = orig.head_dim
    expect = (orig.k_proj.weight[0:hd] + orig.k_proj.weight[hd:2 * hd]) / 2
    torch.testing.assert_close(new.k_proj.weight[0:hd], expect)
    expect_b = (orig.v_proj.bias[2 * hd:3 * hd] + orig.v_proj.bias[3 * hd:4 * hd]) / 2
    torch.testing.assert_close(new.v_proj.bias[hd:2 * hd], expect_b)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_declared_cache_is_kv_heads_heads(fresh, h, kv_heads):
    model = h.swap(fresh(), GqaBuilder(), kv_heads=kv_heads)
    assert model.model.decoder.layers[0].encoder_attn.kv_cache_bytes_per_token() == 2 * kv_heads * 16 * 4


def test_kwarg_errors(stock):
    builder = GqaBuilder()
    slot = whisper.slots(stock)[0]
    with pytest.raises(KwargError, match="kv_heads.*required"):
        builder.validate({})
    with pytest.raises(KwargError, match="kv_heads"):
        builder.validate({"kv_heads": 0})
    with pytest.raises(KwargError, match=r"kv_heads'=3.*allowed values: 1, 2, 4"):
        builder.check_slot(slot, builder.validate({"kv_heads": "3"}))


def rotation(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return q


def heads_alike_up_to_rotation(model, seed: int = 0):
    """Make every head's K (and V, with its bias) rows a rotation of head 0's, per slot: pooling then loses
    nothing once the heads are aligned."""
    with torch.no_grad():
        for i, slot in enumerate(whisper.slots(model)):
            m = model.get_submodule(slot.path)
            hd = slot.embed_dim // slot.num_heads
            for h in range(1, slot.num_heads):
                s = slice(h * hd, (h + 1) * hd)
                r_k, r_v = rotation(hd, seed + 100 * i + h), rotation(hd, seed + 100 * i + h + 50)
                m.k_proj.weight[s] = r_k.T @ m.k_proj.weight[:hd]
                m.v_proj.weight[s] = r_v.T @ m.v_proj.weight[:hd]
                m.v_proj.bias[s] = r_v.T @ m.v_proj.bias[:hd]
    return model


@pytest.mark.parametrize("with_context", [True, False])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_aligned_and_pooled_equals_mha_when_heads_differ_by_rotation(fresh, features, decoder_ids, h, kv_heads,
                                                                      with_context):
    from mla_registry import testing

    reference = heads_alike_up_to_rotation(fresh())
    context = testing.ForwardContext(reference) if with_context else None
    aligned = h.swap(heads_alike_up_to_rotation(fresh()), GqaBuilder(), context=context, kv_heads=kv_heads,
                     align=True)
    plain = h.swap(heads_alike_up_to_rotation(fresh()), GqaBuilder(), kv_heads=kv_heads)
    want = h.logits(reference, features, decoder_ids)
    torch.testing.assert_close(h.logits(aligned, features, decoder_ids), want, atol=2e-4, rtol=1e-4)
    assert (h.logits(plain, features, decoder_ids) - want).abs().max() > 1e-2  # unaligned pooling loses
    assert torch.equal(h.greedy(aligned, features), h.greedy(reference, features))


def heads_alike_up_to_linear_maps(model, seed: int = 0):
    """Make every head's K rows an invertible linear map of head 0's, and its V rows another one, each head
    with its own V bias, per slot: one fitted K/V head per group then loses nothing, whatever the grouping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in whisper.slots(model):
            m = model.get_submodule(slot.path)
            hd = slot.embed_dim // slot.num_heads
            for h in range(1, slot.num_heads):
                s = slice(h * hd, (h + 1) * hd)
                m_k, m_v = (torch.eye(hd) + 0.4 * torch.randn(hd, hd, generator=g) / hd ** 0.5 for _ in range(2))
                m.k_proj.weight[s] = m_k @ m.k_proj.weight[:hd]
                m.v_proj.weight[s] = m_v @ m.v_proj.weight[:hd]
                m.v_proj.bias[s] = torch.randn(hd, generator=g)
    return model


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_fitted_equals_mha_when_heads_differ_by_linear_maps(fresh, features, decoder_ids, h, kv_heads):
    """pool=fit folds each head's map from the shared K/V head into its query and output projections (and its
    V bias into the output bias): exact where the heads of a group are linear maps of one another, which
    rotation-aligned mean pooling is not."""
    from mla_registry import testing

    reference = heads_alike_up_to_linear_maps(fresh())
    context = testing.ForwardContext(reference)
    fitted = h.swap(heads_alike_up_to_linear_maps(fresh()), GqaBuilder(), context=context, kv_heads=kv_heads,
                    pool="fit")
    aligned = h.swap(heads_alike_up_to_linear_maps(fresh()), GqaBuilder(), context=context, kv_heads=kv_heads,
                     align=True)
    want = h.logits(reference, features, decoder_ids)
    torch.testing.assert_close(h.logits(fitted, features, decoder_ids), want, atol=2e-4, rtol=1e-4)
    assert (h.logits(aligned, features, decoder_ids) - want).abs().max() > 1e-2  # a rotation cannot match them
    assert torch.equal(h.greedy(fitted, features), h.greedy(reference, features))
    assert torch.equal(h.greedy(fitted, features, num_beams=3), h.greedy(reference, features, num_beams=3))


def test_fitted_errs_less_than_aligned_mean_pooling(stock, context, h):
    """On the random model's calibration data, every slot's attention-output error under pool=fit is below
    that of the aligned mean (the best mean pooling) for the same grouping."""
    from mla_registry import conversion_math as cm
    from mla_registry import head_grouping as hg
    from mla_registry.plugins.gqa import _sample

    for slot in whisper.slots(stock):
        w = hg.HeadWeights.of(stock.get_submodule(slot.path), slot.num_heads)
        keys, queries = context.calibration_inputs(slot), context.query_inputs(slot)
        probe = hg.Probe.of(queries, keys, slot.is_cross, frames=h.FRAMES)
        groups = hg.contiguous(slot.num_heads, 2)
        fit = hg.output_error(w, groups, probe, hg.fitting(cm.stats_of(keys), cm.stats_of(queries)))
        mean = hg.output_error(w, groups, probe, hg.mean_pooling(_sample(keys), True))
        assert fit < mean, slot.name


def test_fit_with_one_head_per_group_is_the_original(stock, fresh, context, features, decoder_ids, h):
    model = h.swap(fresh(), GqaBuilder(), context=context, kv_heads=h.HEADS, pool="fit")
    torch.testing.assert_close(h.logits(model, features, decoder_ids), h.logits(stock, features, decoder_ids),
                               atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(("pool", "align"), [("mean", False), ("mean", True), ("fit", False)])
@pytest.mark.parametrize("exhaustive", [True, False])
def test_search_is_never_worse_than_contiguous_on_its_objective(stock, fresh, context, h, monkeypatch, pool, align,
                                                                exhaustive):
    from mla_registry import head_grouping as hg
    from mla_registry import lineage
    from mla_registry.plugins.gqa import _conversion

    if not exhaustive:
        monkeypatch.setattr(hg, "EXHAUSTIVE_LIMIT", 0)
    kwargs = {"kv_heads": 2, "grouping": "search", "align": align, "pool": pool}
    model = h.swap(fresh(), GqaBuilder(), context=context, **kwargs)
    records = {r.path: r for r in lineage.of(model).slots}
    chosen_differs = False
    for slot in whisper.slots(stock):
        groups = hg.parse_groups(records[slot.path].convert_kwargs["groups"], slot.num_heads, 2)
        assert records[slot.path].convert_kwargs["pool"] == pool
        w = hg.HeadWeights.of(stock.get_submodule(slot.path), slot.num_heads)
        probe = hg.Probe.of(context.query_inputs(slot), context.calibration_inputs(slot), slot.is_cross,
                            frames=h.FRAMES)
        convert = _conversion(slot, context, kwargs)
        base = hg.output_error(w, hg.contiguous(slot.num_heads, 2), probe, convert)
        assert hg.output_error(w, groups, probe, convert) <= base
        chosen_differs |= groups != hg.contiguous(slot.num_heads, 2)
    assert chosen_differs  # on random weights some layer prefers another grouping


def test_fit_kwarg_errors(fresh, h):
    with pytest.raises(KwargError, match="'align'=true has no effect with pool='fit'"):
        h.swap(fresh(), GqaBuilder(), kv_heads=2, pool="fit", align=True)
    with pytest.raises(KwargError, match="pool='fit' needs calibration audio"):
        h.swap(fresh(), GqaBuilder(), kv_heads=2, pool="fit")
    with pytest.raises(KwargError, match="pool"):
        GqaBuilder().validate({"kv_heads": 2, "pool": "median"})


def test_partitions_are_all_the_groupings():
    from mla_registry import head_grouping as hg

    six = list(hg.partitions(6, 2))
    assert len(six) == len(set(six)) == hg.count_partitions(6, 2) == 10
    assert len(list(hg.partitions(6, 3))) == hg.count_partitions(6, 3) == 15
    assert hg.parse_groups(hg.format_groups(six[3]), 6, 2) == six[3]
    with pytest.raises(ValueError, match="not a partition"):
        hg.parse_groups("0.1.2|2.3.4", 6, 2)


def test_a_given_grouping_is_checked(fresh, h):
    with pytest.raises(KwargError, match="'groups'.*not a partition"):
        h.swap(fresh(), GqaBuilder(), kv_heads=2, groups="0.1|1.3")
