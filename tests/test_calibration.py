"""mla_registry.calibration: what each slot really sees on real audio, one knob for the size, nothing loaded
for conversions that need no calibration."""

from __future__ import annotations

import pytest

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
