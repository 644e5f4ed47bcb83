"""Self-describing checkpoints: what a converted model saves is what load() rebuilds, strictly."""

import json

import pytest
import torch

from mla_registry import checkpoint, surgery
from mla_registry.errors import CheckpointError, PluginError

VARIANTS = [  # plugin x kwargs table driving the round trips (PEFT style)
    ("mha", "decoder.*=mha"),
    ("gqa-2", "decoder.*=gqa:kv_heads=2"),
    ("mqa", "decoder.self=gqa:kv_heads=1"),
    ("mla-16-svd", "decoder.*=mla:rank=16,init=svd"),
    ("mla-16-plain", "decoder.cross=mla:rank=16,init=svd,absorb=false"),
    ("mixed", "decoder.self=gqa:kv_heads=2;decoder.cross=mla:rank=24,init=svd"),
]


class NoCalibration:
    def calibration_inputs(self, slot, data, size):
        raise AssertionError("these variants need no calibration")


def convert(model, specs: str):
    return surgery.convert(model, [surgery.parse_spec(s) for s in specs.split(";")], NoCalibration())


def outputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 80, 3000, generator=g)
    ids = torch.tensor([[50257, 50362, 440, 1029, 318, 257], [50257, 50362, 1026, 11, 290, 13]])
    with torch.no_grad():
        logits = model(input_features=feats, decoder_input_ids=ids).logits
        tokens = model.generate(feats, max_new_tokens=8, num_beams=2)
    return logits, tokens


@pytest.mark.parametrize("name,specs", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_round_trip(tiny_model, tmp_path, name, specs):
    model = tiny_model()
    records = convert(model, specs)
    before = outputs(model)
    checkpoint.save(model, tmp_path / name)
    manifest = json.loads((tmp_path / name / checkpoint.MANIFEST).read_text())
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION
    assert manifest["slots"] == records and len(records) >= 2
    assert {r["plugin"] for r in records} <= {"mha", "gqa", "mla"}
    assert all(r["package"].startswith("mla-registry") for r in records)
    assert "transformers" in manifest["written_by"]
    assert not list((tmp_path / name).glob("*.bin")) and not list((tmp_path / name).glob("*.pt"))

    loaded = checkpoint.load(tmp_path / name)
    after = outputs(loaded)
    assert torch.equal(before[1], after[1])
    torch.testing.assert_close(before[0], after[0], rtol=0, atol=1e-5)
    assert [type(loaded.get_submodule(r["path"])) for r in records] == [
        type(model.get_submodule(r["path"])) for r in records]


def _saved(tiny_model, tmp_path, specs="decoder.*=mla:rank=16,init=svd"):
    model = tiny_model()
    convert(model, specs)
    return checkpoint.save(model, tmp_path / "ckpt")


def _edit_manifest(path, fn):
    m = json.loads((path / checkpoint.MANIFEST).read_text())
    fn(m)
    (path / checkpoint.MANIFEST).write_text(json.dumps(m))


def test_missing_plugin_is_named_with_its_package(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)

    def rename(m):
        m["slots"][0].update(plugin="fancy-latent", package="fancy-attn 2.0")
    _edit_manifest(path, rename)
    with pytest.raises(PluginError, match=r"'fancy-latent'.*pip install fancy-attn"):
        checkpoint.load(path)


def test_newer_format_is_refused(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)
    _edit_manifest(path, lambda m: m.update(format_version=checkpoint.FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match="format 2 .*Upgrade"):
        checkpoint.load(path)


def test_shape_mismatch_is_an_error_not_a_wrong_model(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)
    _edit_manifest(path, lambda m: [s["kwargs"].update(rank=12) for s in m["slots"]])
    with pytest.raises(CheckpointError, match="do not fit"):
        checkpoint.load(path)


def test_weights_of_unconverted_modules_must_match(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)
    _edit_manifest(path, lambda m: m.update(slots=m["slots"][1:]))  # one MLA slot "forgotten"
    with pytest.raises(CheckpointError, match="missing: .*unexpected: .*k_up|missing.*k_proj"):
        checkpoint.load(path)


def test_save_is_atomic(tiny_model, tmp_path, monkeypatch):
    path = _saved(tiny_model, tmp_path)
    first = (path / "model.safetensors").read_bytes()
    model = tiny_model(seed=5)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(model, "save_pretrained", boom)
    with pytest.raises(OSError):
        checkpoint.save(model, path)
    assert (path / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_not_a_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoint.load(tmp_path)
