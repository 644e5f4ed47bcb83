"""mla_registry.calibration: what each slot really sees on real audio, one knob for the size, nothing loaded
for conversions that need no calibration."""

from __future__ import annotations

import copy

import pytest
import torch

from mla_registry import model_refs, whisper
from mla_registry.calibration import CalibrationContext, CalibrationSettings
from mla_registry.errors import DataError

REAL = "builtin:real?source=librispeech_dev_clean"


@pytest.fixture(scope="module")
def bundled():
    return model_refs.load("bundled:whisper-tiny.en")


def test_inputs_are_what_each_slot_sees(bundled):
    model, processor = bundled
    ctx = CalibrationContext(model, processor, CalibrationSettings(REAL, 3))
    slots = {s.name: s for s in whisper.slots(model)}
    enc = ctx.calibration_inputs(slots["encoder.self.0"])
    assert enc.shape == (3 * 1500, 384)  # every encoder frame of 3 utterances
    cross = ctx.calibration_inputs(slots["decoder.cross.2"])
    assert cross.shape == enc.shape and cross is ctx.calibration_inputs(slots["decoder.cross.0"])
    dec = ctx.calibration_inputs(slots["decoder.self.1"])
    assert 20 < dec.shape[0] < 300 and dec.shape[1] == 384  # decoder positions of 3 transcripts, no padding
    assert ctx.query_inputs(slots["decoder.cross.1"]).shape == dec.shape  # queries: decoder states, not frames
    # the encoder output the cross slots see is the encoder's real output on the calibration audio
    assert ctx.used["size"] == 3 and ctx.used["ref"] == REAL and ctx.used["fingerprint"]


def test_nothing_is_loaded_until_a_plugin_asks(bundled, monkeypatch):
    from mla_registry import data

    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("calibration data loaded"))
    ctx = CalibrationContext(*bundled, CalibrationSettings(REAL, 3))
    assert ctx.used is None


def test_a_calibration_set_smaller_than_asked_is_an_error(bundled):
    ctx = CalibrationContext(*bundled, CalibrationSettings("builtin:real?source=jfk", 5))
    with pytest.raises(DataError, match="has 1 utterances; calibration_size asks for 5"):
        ctx.calibration_inputs(whisper.slots(bundled[0])[0])


def test_a_capture_takes_the_runs_encoder_outputs_and_leaves_them_for_training(bundled):
    """In a run the calibration clips' encoder outputs go through the run's cache: the captured inputs are those
    of a capture that runs the whole model, and a training set that starts with the same clips finds them."""
    from mla_registry import data
    from mla_registry.calibration import CapturedInputs
    from mla_registry.encoder_cache import EncoderOutputs, encoder_fingerprint, set_batches

    model, processor = bundled
    slots = {s.name: s for s in whisper.slots(model)}
    decoder = [s.path for s in slots.values() if s.kind.startswith("decoder")]
    settings, outputs = CalibrationSettings(REAL, 4), EncoderOutputs()
    ctx = CalibrationContext(model, processor, settings, paths=decoder, shared=CapturedInputs(outputs, 2))
    alone = CalibrationContext(model, processor, settings, paths=decoder)
    for name in ("decoder.cross.0", "decoder.self.1"):
        assert torch.equal(ctx.calibration_inputs(slots[name]), alone.calibration_inputs(slots[name]))
        assert torch.equal(ctx.query_inputs(slots[name]), alone.query_inputs(slots[name]))
    assert outputs.misses == 2  # 4 clips in batches of 2
    train = set_batches(encoder_fingerprint(model), data.load(REAL, limit=6, quiet=True), 2)
    found = [outputs.peek(key, tuple(u.id for u in batch)) is not None for batch, key in train]
    assert found == [True, True, False]
    # an encoder slot needs the encoder's own pass (its hooks): the cache is not asked
    enc = slots["encoder.self.0"]
    encoder = CalibrationContext(model, processor, settings, paths=[enc.path], shared=CapturedInputs(outputs, 2))
    assert encoder.calibration_inputs(enc).shape == (4 * 1500, 384) and outputs.hits == 2


def test_a_capture_is_shared_by_later_conversions_of_the_same_weights(bundled):
    """An experiment's variants convert one base model: the calibration pass runs once, each conversion records
    only the slots it converts, and the inputs are those a lone conversion of every slot sees."""
    from mla_registry.calibration import CapturedInputs

    model, processor = bundled
    slots = {s.name: s for s in whisper.slots(model)}
    decoder = [s.path for s in slots.values() if s.kind.startswith("decoder")]
    settings, shared = CalibrationSettings(REAL, 2), CapturedInputs()
    first = CalibrationContext(model, processor, settings, paths=decoder, shared=shared)
    cross, dec = first.calibration_inputs(slots["decoder.cross.3"]), first.query_inputs(slots["decoder.self.1"])
    assert (shared.captures, shared.reuses) == (1, 0) and set(first._query) == set(decoder)
    later = CalibrationContext(model, processor, settings, paths=decoder[:2], shared=shared)
    assert later.calibration_inputs(slots["decoder.self.0"]) is first.calibration_inputs(slots["decoder.self.0"])
    assert (shared.captures, shared.reuses) == (1, 1) and later.used == first.used
    alone = CalibrationContext(model, processor, settings)  # every slot, nothing shared
    assert torch.equal(alone.calibration_inputs(slots["decoder.cross.0"]), cross)
    assert torch.equal(alone.query_inputs(slots["decoder.self.1"]), dec)
    # a slot no earlier conversion recorded, or other weights: a new pass
    enc = slots["encoder.self.0"]
    encoder = CalibrationContext(model, processor, settings, paths=[enc.path], shared=shared)
    assert torch.equal(encoder.calibration_inputs(enc), alone.calibration_inputs(enc))
    assert shared.captures == 2
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.decoder.layers[0].fc1.weight.mul_(0.5)
    moved = CalibrationContext(other, processor, settings, paths=decoder, shared=shared)
    assert not torch.equal(moved.query_inputs(slots["decoder.self.1"]), dec) and shared.captures == 3
