"""Checkpoints for the export tests, built once per session: Whisper tiny.en with its decoder converted to MLA
(rank 192, activation-aware), to MLA with one latent shared by the cross slots (self rank 96, cross 384), and to
GQA (2 K/V heads), saved and reloaded like any checkpoint; and the real clips every export is checked on."""

from __future__ import annotations

import pytest
import torch

from mla_registry import checkpoint, data, model_refs, whisper
from mla_registry.calibration import CalibrationSettings
from mla_registry.convert import convert_model

CALIBRATION = CalibrationSettings("builtin:real?source=librispeech_dev_clean", 4)  # never the test clips
SPECS = {"mla": ["decoder.*=mla:rank=192"], "gqa": ["decoder.*=gqa:kv_heads=2"],
         "mla-shared": ["decoder.self=mla:rank=96", "decoder.cross=mla:rank=384,share_cross=true"]}
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="session")
def export_ckpts(tmp_path_factory):
    """``{name: checkpoint directory}`` for every entry of :data:`SPECS`."""
    root = tmp_path_factory.mktemp("export-ckpts")
    out = {}
    for name, specs in SPECS.items():
        model, processor = model_refs.load("bundled:whisper-tiny.en")
        convert_model(model, processor, specs, CALIBRATION, source_model="bundled:whisper-tiny.en")
        out[name] = checkpoint.save(model, root / name, processor)
    return out


@pytest.fixture(scope="session")
def real_clips():
    """Four real recordings (LibriSpeech test-clean and CMU Arctic) and their log-mel features."""
    utts = [*data.load("builtin:real?source=librispeech_test_clean", limit=2, quiet=True),
            *data.load("builtin:real?source=cmu_arctic_samples", limit=2, quiet=True)]
    _, processor = model_refs.load("bundled:whisper-tiny.en")
    return utts, whisper.input_features(processor, [u.audio for u in utts])


@pytest.fixture(scope="session")
def ckpt_tokens(export_ckpts, real_clips):
    """``{name: (reloaded checkpoint, its greedy tokens on the real clips)}``: decoded once per session."""
    out = {}
    for name, ckpt in export_ckpts.items():
        model = model_refs.load_model(str(ckpt))
        out[name] = model, greedy(model, real_clips[1])
    return out


def greedy(model, feats) -> list[list[int]]:
    """``generate()``'s greedy tokens per clip (generated ones only, up to the first end-of-text)."""
    with torch.no_grad():
        seqs = model.generate(feats, max_new_tokens=MAX_NEW_TOKENS, num_beams=1, do_sample=False)
    eos = model.generation_config.eos_token_id
    prompt = len(whisper.prompt_ids(model))
    rows = []
    for row in seqs.tolist():
        row = row[prompt:] if row[:1] == [model.generation_config.decoder_start_token_id] else row
        rows.append(row[:row.index(eos)] if eos in row else row)
    return rows
