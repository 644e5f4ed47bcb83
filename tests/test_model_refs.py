"""mla_registry.model_refs: hub ids, local directories and bundled models; devices and dtypes checked."""

from __future__ import annotations

import pytest
import torch

from mla_registry import checkpoint, model_refs
from mla_registry.errors import ModelRefError


def test_local_directories_and_bundled_references(tiny_model, tmp_path):
    checkpoint.save(tiny_model(), tmp_path / "m")
    assert model_refs.resolve(str(tmp_path / "m")) == str(tmp_path / "m")
    assert model_refs.load_model(str(tmp_path / "m")).config.d_model == 64
    assert (model_refs.resolve("bundled:whisper-tiny.en").rstrip("/")).endswith("whisper-tiny.en")
    assert model_refs.resolve("openai/whisper-tiny.en") == "openai/whisper-tiny.en"  # a hub id stays one


def test_bad_references_name_what_is_wrong(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelRefError, match="not a model directory"):
        model_refs.resolve(str(tmp_path / "empty"))
    with pytest.raises(ModelRefError, match="no such directory"):
        model_refs.resolve("./nowhere/at/all")
    with pytest.raises(ModelRefError, match="unknown bundled model 'whisper-huge'"):
        model_refs.resolve("bundled:whisper-huge")
    with pytest.raises(ModelRefError, match="hub"):  # offline: from_pretrained fails, the message says so
        model_refs.load_model("nobody-here/no-such-model-xyz")


def test_dtypes_and_devices():
    assert model_refs.parse_dtype("bf16") is torch.bfloat16 and model_refs.parse_dtype(None) is None
    with pytest.raises(ModelRefError, match="dtype 'float8'"):
        model_refs.parse_dtype("float8")
    assert model_refs.check_device("cpu") == "cpu"
    with pytest.raises(ModelRefError, match="device 'quantum': not a torch device"):
        model_refs.check_device("quantum")
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in model_refs.device_problem("cuda:0")
