import pytest
import torch

from mla_registry import surgery, whisper
from mla_registry.errors import KwargError, SlotError


def test_parse_spec():
    s = surgery.parse_spec("decoder.*=mla:rank=192, init=svd")
    assert (s.selector, s.plugin, s.kwargs) == ("decoder.*", "mla", {"rank": "192", "init": "svd"})
    assert surgery.parse_spec("decoder.self=mha").kwargs == {}
    for bad in ("decoder.*", "=mla", "decoder.*=mla:rank"):
        with pytest.raises(KwargError, match="must read"):
            surgery.parse_spec(bad)


def test_select(tiny_model):
    slots = whisper.slots(tiny_model(layers=3))
    names = lambda sel: [s.name for s in surgery.select(slots, sel)]  # noqa: E731
    assert names("decoder.cross") == ["decoder.cross.0", "decoder.cross.1", "decoder.cross.2"]
    assert names("decoder.*") == ["decoder.self.0", "decoder.cross.0", "decoder.self.1", "decoder.cross.1",
                                  "decoder.self.2", "decoder.cross.2"]
    assert names("decoder.self.1") == ["decoder.self.1"]
    assert names("decoder.cross[0,2]") == ["decoder.cross.0", "decoder.cross.2"]
    assert names("encoder.self[1-2]+decoder.self.0") == ["encoder.self.1", "encoder.self.2", "decoder.self.0"]
    assert len(names("*")) == 9


def test_select_nothing_lists_the_slots(tiny_model):
    slots = whisper.slots(tiny_model())
    with pytest.raises(SlotError, match=r"decoder\.cros.*available: decoder\.cross \(layers 0-1\)"):
        surgery.select(slots, "decoder.cros")
    with pytest.raises(SlotError, match="matches no attention slot"):
        surgery.select(slots, "decoder.self.7")


def test_plan_validates_before_touching_weights(tiny_model):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KwargError, match="kv_heads"):
        surgery.plan(model, [surgery.parse_spec("decoder.self=mha"), surgery.parse_spec("decoder.*=gqa:kv_heads=3")])
    with pytest.raises(KwargError, match="unknown kwarg"):
        surgery.plan(model, [surgery.parse_spec("decoder.*=mla:rank=8,rnak=3")])
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())


def test_later_specs_win(tiny_model):
    model = tiny_model()
    planned = surgery.plan(model, [surgery.parse_spec("decoder.*=gqa:kv_heads=2"),
                                   surgery.parse_spec("decoder.cross.1=mla:rank=8,init=svd")])
    got = {p.slot.name: p.builder.name for p in planned}
    assert got == {"decoder.self.0": "gqa", "decoder.cross.0": "gqa", "decoder.self.1": "gqa",
                   "decoder.cross.1": "mla"}


def test_replace_slots_records_per_slot_and_owns_device_dtype_and_mode(tiny_model):
    from mla_registry import lineage

    model = tiny_model().to(torch.float64).train()
    records = surgery.replace_slots(model, [surgery.parse_spec("decoder.cross=mla:rank=8,init=svd")], None)
    assert [r.slot for r in records] == ["decoder.cross.0", "decoder.cross.1"] == [
        r.slot for r in lineage.of(model).slots]
    module = model.get_submodule(records[0].path)
    assert next(module.parameters()).dtype == torch.float64 and module.training
    assert records[0].kwargs == {"rank": 8, "absorb": True, "latent_from": None}
    assert records[0].convert_kwargs == {"init": "svd", "v_weight": None, "refit": False, "budget": None,
                                         "budget_scope": "kind", "share_cross": False}


def test_a_builder_may_decide_per_slot_kwargs(tiny_model, monkeypatch):
    """The plan hook (e.g. ranks under one KV budget): what it returns is checked and recorded per slot."""
    from mla_registry.plugins.mla import MlaBuilder

    def plan(self, slots, kwargs, context):
        return {s.path: {**kwargs, "rank": 4 * (i + 1)} for i, s in enumerate(slots)}

    monkeypatch.setattr(MlaBuilder, "plan", plan)
    model = tiny_model()
    records = surgery.replace_slots(model, [surgery.parse_spec("decoder.*=mla:rank=8,init=svd")], None)
    assert [r.kwargs["rank"] for r in records] == [4, 8, 12, 16]
    assert surgery.describe(model)["decoder.self"] == "mla(rank=4..12)"
    monkeypatch.setattr(MlaBuilder, "plan", lambda self, slots, kwargs, context: {
        s.path: {**kwargs, "rank": 1000} for s in slots})
    with pytest.raises(KwargError, match="at slot decoder.self.0.*'rank'=1000"):
        surgery.replace_slots(tiny_model(), [surgery.parse_spec("decoder.*=mla:rank=8,init=svd")], None)


def test_a_plugin_check_that_crashes_is_a_kwarg_error_naming_the_plugin(tiny_model, monkeypatch):
    from mla_registry.plugins.gqa import GqaBuilder

    monkeypatch.setattr(GqaBuilder, "check_slot", lambda self, slot, kwargs: 1 / 0)
    with pytest.raises(KwargError, match="plugin 'gqa'.*ZeroDivisionError"):
        surgery.plan(tiny_model(), [surgery.parse_spec("decoder.*=gqa:kv_heads=2")])


def test_labels(tiny_model):
    model = tiny_model()
    surgery.replace_slots(model, [surgery.parse_spec("decoder.self=gqa:kv_heads=2"),
                                  surgery.parse_spec("decoder.cross.1=mla:rank=8,init=svd")], None)
    described = surgery.describe(model)
    assert described == {"encoder.self": "stock", "decoder.self": "gqa(kv_heads=2)",
                         "decoder.cross": "mla(rank=8)/stock"}
    assert surgery.attention_label(described) == "self=gqa(kv_heads=2) cross=mla(rank=8)/stock"
    assert surgery.attention_label({"encoder.self": "mha", "decoder.self": "stock"}) == "enc.self=mha self=stock"
