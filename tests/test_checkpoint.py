"""Self-describing checkpoints: what a converted model saves is what load() rebuilds, strictly."""

import json

import pytest
import torch

from mla_registry import checkpoint, lineage, surgery
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
    def calibration_inputs(self, slot):
        raise AssertionError("these variants need no calibration")

    query_inputs = calibration_inputs


def convert(model, specs: str):
    return surgery.replace_slots(model, [surgery.parse_spec(s) for s in specs.split(";")], NoCalibration())


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
    assert manifest["slots"] == [r.to_json() for r in records] and len(records) >= 2
    assert {r.plugin for r in records} <= {"mha", "gqa", "mla"}
    assert all(r.package.startswith("mla-registry") for r in records)
    assert "transformers" in manifest["written_by"]
    assert not list((tmp_path / name).glob("*.bin")) and not list((tmp_path / name).glob("*.pt"))

    loaded = checkpoint.load(tmp_path / name)
    after = outputs(loaded)
    assert torch.equal(before[1], after[1])
    torch.testing.assert_close(before[0], after[0], rtol=0, atol=1e-5)
    assert [type(loaded.get_submodule(r.path)) for r in records] == [type(model.get_submodule(r.path)) for r in records]
    assert lineage.of(loaded).slots == records


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
    with pytest.raises(PluginError, match=r"'fancy-latent'.*manifest says .*'fancy-attn 2.0'") as err:
        checkpoint.load(path)
    assert "pip install" not in str(err.value)


def test_newer_format_is_refused(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)
    _edit_manifest(path, lambda m: m.update(format_version=checkpoint.FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match=f"format {checkpoint.FORMAT_VERSION + 1} .*Upgrade"):
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
        checkpoint.save(model, path, overwrite=True)
    assert (path / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_not_a_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoint.load(tmp_path)


def test_a_directory_the_user_owns_is_never_replaced(tiny_model, tmp_path, monkeypatch):
    """convert --out EXISTING_DIR used to delete everything in it; --out "$PWD" the working directory."""
    model = tiny_model()
    convert(model, "decoder.*=mla:rank=16,init=svd")
    thesis = tmp_path / "mine"
    (thesis / "notes").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("chapter 1")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="not an mla-registry checkpoint"):
            checkpoint.save(model, thesis, overwrite=overwrite)
    assert (thesis / "thesis.tex").read_text() == "chapter 1" and (thesis / "notes").is_dir()
    monkeypatch.chdir(thesis)
    with pytest.raises(CheckpointError, match="current working directory"):
        checkpoint.save(model, ".", overwrite=True)
    with pytest.raises(CheckpointError, match="current working directory"):
        checkpoint.save(model, tmp_path, overwrite=True)
    assert sorted(p.name for p in thesis.iterdir()) == ["notes", "thesis.tex"]


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)
    other = tiny_model(seed=3)
    convert(other, "decoder.*=gqa:kv_heads=2")
    with pytest.raises(CheckpointError, match="--overwrite"):
        checkpoint.save(other, path)
    assert {r["plugin"] for r in checkpoint.read_manifest(path)["slots"]} == {"mla"}
    checkpoint.save(other, path, overwrite=True)
    assert {r["plugin"] for r in checkpoint.read_manifest(path)["slots"]} == {"gqa"}
    empty = tmp_path / "empty"
    empty.mkdir()
    checkpoint.save(other, empty)  # an empty directory is fine
    assert checkpoint.is_checkpoint(empty)


def test_temporaries_of_a_killed_write_are_cleaned_by_the_next_write(tiny_model, tmp_path):
    import os
    import time

    path = _saved(tiny_model, tmp_path)
    stale = tmp_path / ".ckpt.abc123.tmp"  # what kill -9 in the middle of a save leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / ".ckpt.live99.tmp"  # a concurrent writer's, minutes old: kept
    live.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    unrelated = tmp_path / ".other.tmp"
    unrelated.mkdir()
    model = tiny_model()
    convert(model, "decoder.*=mha")
    checkpoint.save(model, path, overwrite=True)
    assert not stale.exists() and live.exists() and unrelated.exists()


def test_every_file_gets_the_users_usual_mode(tiny_model, tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        path = _saved(tiny_model, tmp_path)
    finally:
        os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes[checkpoint.MANIFEST] == modes["model.safetensors"] == modes["config.json"] == 0o644, modes
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


def test_format_1_provenance_is_read(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)

    def old(m):
        m["format_version"] = 1
        m["provenance"] = {"source_model": "x", "finetune": {"best_valid_loss": 0.5},
                           "finetune_history": [{"best_valid_loss": 0.9}]}
    _edit_manifest(path, old)
    prov = lineage.of(checkpoint.load(path)).provenance
    assert prov.source_model == "x" and [f["best_valid_loss"] for f in prov.finetunes] == [0.9, 0.5]


def test_another_model_family_is_refused(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)
    _edit_manifest(path, lambda m: m.update(family="llama"))
    with pytest.raises(CheckpointError, match="family 'llama'"):
        checkpoint.load(path)
