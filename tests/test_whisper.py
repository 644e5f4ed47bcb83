"""mla_registry/whisper.py: the encoder in slices of rows on CPU gives what one call on the whole batch gives."""

from __future__ import annotations

import torch

from mla_registry import data, model_refs, whisper


def test_sliced_encoder_equals_the_whole_batch():
    model, processor = model_refs.load("bundled:whisper-tiny.en")
    utts = data.load("builtin:real?source=cmu_arctic_samples", limit=5, quiet=True)
    feats = whisper.input_features(processor, [u.audio for u in utts])
    assert feats.shape[0] == 5 > whisper.CPU_ENCODER_SLICE  # an odd count: the last slice is short
    with torch.no_grad():
        whole = model.get_encoder()(feats).last_hidden_state
        sliced = whisper.encode(model, feats)
        alone = model.get_encoder()(feats[3:4]).last_hidden_state
    assert sliced.shape == whole.shape == (5, 1500, model.config.d_model)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(sliced[3:4], alone, rtol=0, atol=1e-5)
