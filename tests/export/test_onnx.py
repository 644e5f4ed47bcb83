"""``--to onnx`` run by ONNX Runtime: the graphs carry the plugin's own cache (MLA's latent, GQA's pooled
heads), whose real sizes equal what the plugin declares, and the greedy tokens are the checkpoint's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mla_registry import kvcache, model_refs
from mla_registry.evaluate import DecodeSettings, evaluate
from mla_registry.export import PROVENANCE, export
from mla_registry.export.backends import OnnxRuntimeBackend
from mla_registry.export.ort import OrtWhisper

from .conftest import MAX_NEW_TOKENS

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def onnx_exports(export_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {name: export(ckpt, "onnx", root / name) and root / name for name, ckpt in export_ckpts.items()}


def ort_tokens(runtime: OrtWhisper, feats) -> list[list[int]]:
    rows = runtime.generate(runtime.encode(feats.numpy()), MAX_NEW_TOKENS)
    out = []
    for row in rows:
        row = row[2:]  # the prompt: <|startoftranscript|><|notimestamps|>
        out.append(row[:row.index(50256)] if 50256 in row else row)
    return out


@pytest.mark.parametrize("name", ["mla", "gqa", "mla-shared"])
def test_onnx_runtime_tokens_and_cache(ckpt_tokens, onnx_exports, real_clips, name):
    model, ours = ckpt_tokens[name]
    runtime = OrtWhisper(onnx_exports[name], threads=1)
    _, feats = real_clips
    theirs = ort_tokens(runtime, feats)
    assert sum(a != b for a, b in zip(ours, theirs)) <= 1  # float32 kernels in another order: a near-tie may flip
    assert ours[0] == theirs[0]
    # the cache tensors ONNX Runtime really passed: the plugin's own, of the size it declares
    shapes = runtime.last_cache.shapes
    batch = feats.shape[0]
    if name == "mla":
        assert shapes["cross.0.key"] == [batch, 1, 1500, 192]
        assert not any(n.endswith(".value") for n in shapes)  # the latent only, never K/V
    elif name == "mla-shared":  # one latent for the four cross layers: layer 0's entry, the others empty
        assert shapes["cross.0.key"] == [batch, 1, 1500, 384]
        assert not any(f"cross.{i}." in n for i in (1, 2, 3) for n in shapes)  # nothing passed for them
    else:
        assert shapes["cross.0.key"] == shapes["cross.0.value"] == [batch, 2, 1500, 64]
    declared_self, declared_cross = kvcache.declared(model)
    assert runtime.last_cache.self_per_token == declared_self
    assert runtime.last_cache.cross_per_frame == declared_cross
    stock_cross = 2 * 384 * 4 * 4  # K and V of every head, 4 layers, float32
    assert declared_cross < stock_cross


def test_encode_in_slices_equals_the_whole_batch(onnx_exports, real_clips):
    """On CPU OrtWhisper.encode runs the encoder graph CPU_ENCODER_SLICE rows at a time (memory: the arena held
    a whole batch's attention scores); each row is encoded on its own, so the output is the whole batch's."""
    from mla_registry.whisper import CPU_ENCODER_SLICE

    runtime = OrtWhisper(onnx_exports["gqa"], threads=1)
    feats = real_clips[1][:3].numpy()  # 3 rows: a slice of 2 and a slice of 1
    assert len(feats) > CPU_ENCODER_SLICE
    whole = runtime.sessions["encoder"].run(None, {"input_features": feats})[0]
    sliced = runtime.encode(feats)
    assert sliced.shape == whole.shape
    np.testing.assert_allclose(sliced, whole, rtol=0, atol=1e-5)


def test_onnx_backend_evaluates_like_pytorch(export_ckpts, onnx_exports, real_clips):
    utts, _ = real_clips
    settings = DecodeSettings(batch_size=4, max_new_tokens=MAX_NEW_TOKENS)
    model, processor = model_refs.load(str(export_ckpts["mla"]))
    ref = evaluate(model, processor, utts, settings, quiet=True)
    backend = OnnxRuntimeBackend(onnx_exports["mla"])
    got = evaluate(backend, backend.processor(), utts, settings, quiet=True)
    assert abs(got["wer"] - ref["wer"]) <= 0.05
    assert got["backend"]["backend"] == "onnxruntime"
    assert got["kv_cross_bytes_per_utterance"] == ref["kv_cross_bytes_per_utterance"]
    prov = json.loads((onnx_exports["mla"] / PROVENANCE).read_text())
    assert prov["format"] == "onnx" and prov["graphs"] == ["encoder.onnx", "cross_cache.onnx", "decoder.onnx"]


def test_evaluate_command_with_onnxruntime_backend(onnx_exports):
    from click.testing import CliRunner

    from mla_registry.cli.main import cli

    result = CliRunner().invoke(cli, ["evaluate", "--model", str(onnx_exports["gqa"]), "--backend", "onnxruntime",
                                      "--data", "builtin:real?source=jfk", "--max-new-tokens", "8", "-q"])
    assert result.exit_code == 0, result.output
    assert "backend onnxruntime" in result.output and "cross.0.key 1x2x1500x64" in result.output


def test_write_onnx_leaves_the_model_in_its_mode(ckpt_tokens, tmp_path):
    """torch.onnx.export restores its wrapper's mode after tracing; a wrapper left in training mode used to
    switch the whole model to training, so MLA stopped absorbing and decoded 16x slower after an export."""
    from mla_registry.export.onnx import write_onnx

    model, _ = ckpt_tokens["mla"]
    _, processor = model_refs.load("bundled:whisper-tiny.en")
    assert not any(m.training for m in model.modules())
    write_onnx(model, processor, tmp_path)
    assert not any(m.training for m in model.modules())
