"""``--to ctranslate2``: CTranslate2's converter on the stock export, decoded by CTranslate2's own
``Whisper.generate``. Tolerance: CTranslate2's kernels sum in another order than PyTorch, so a near-tie between
two tokens may break the other way, so one of the four clips may differ (on all 57 clips of builtin:real none
did: README, "Export and deploy")."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mla_registry.evaluate import DecodeSettings, evaluate
from mla_registry.export import PROVENANCE, export
from mla_registry.export.backends import CTranslate2Backend

from .conftest import MAX_NEW_TOKENS

ctranslate2 = pytest.importorskip("ctranslate2")


def ct2_tokens(path, feats) -> list[list[int]]:
    model = ctranslate2.models.Whisper(str(path), device="cpu")
    sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
    res = model.generate(sv, [[50257, 50362]] * feats.shape[0], beam_size=1, max_length=MAX_NEW_TOKENS + 2)
    return [r.sequences_ids[0] for r in res]


def test_ctranslate2_export_tokens(export_ckpts, ckpt_tokens, real_clips, tmp_path):
    ckpt = export_ckpts["mla"]
    export(ckpt, "ctranslate2", tmp_path / "ct2")
    assert (tmp_path / "ct2" / "model.bin").is_file()
    assert json.loads((tmp_path / "ct2" / PROVENANCE).read_text())["quantization"] == "float32"
    _, feats = real_clips
    ours = ckpt_tokens["mla"][1]
    theirs = ct2_tokens(tmp_path / "ct2", feats)
    assert sum(a != b for a, b in zip(ours, theirs)) <= 1
    # evaluate --backend ctranslate2: the same transcripts through the evaluation path
    utts, _ = real_clips
    settings = DecodeSettings(batch_size=4, max_new_tokens=MAX_NEW_TOKENS)
    backend = CTranslate2Backend(tmp_path / "ct2")
    got = evaluate(backend, backend.processor(), utts, settings, quiet=True)
    assert backend.token_ids == theirs
    assert got["backend"]["backend"] == "ctranslate2" and got["utterances"] == len(utts)


def test_ctranslate2_int8(export_ckpts, real_clips, tmp_path):
    export(export_ckpts["gqa"], "ctranslate2", tmp_path / "int8", quantization="int8")
    assert json.loads((tmp_path / "int8" / PROVENANCE).read_text())["quantization"] == "int8"
    _, feats = real_clips
    assert all(isinstance(t, int) for row in ct2_tokens(tmp_path / "int8", feats[:1]) for t in row)
