import pytest

from mla_registry import surgery
from mla_registry.errors import KwargError, SlotError
from mla_registry.families import whisper


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
