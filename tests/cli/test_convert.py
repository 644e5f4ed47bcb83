"""``mla-registry convert`` through click: writes a checkpoint that reloads, prints the slots, never touches a
directory it does not own, and reports bad input as one line."""

from mla_registry import checkpoint, lineage


def test_convert_writes_a_checkpoint_and_prints_what_it_converted(invoke, tiny_base, tmp_path):
    out = tmp_path / "ckpt"
    result = invoke("convert", "--model", tiny_base, "--attention", "decoder.self=gqa:kv_heads=2",
                    "--attention", "decoder.cross=mla:rank=8,init=svd", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "decoder.self   gqa(kv_heads=2)  (2 layers)" in result.output
    assert "decoder.cross  mla(rank=8)  (2 layers)" in result.output and f"wrote {out}" in result.output
    model = checkpoint.load(out)
    assert [r.plugin for r in lineage.of(model).slots] == ["gqa", "mla", "gqa", "mla"]
    prov = lineage.of(model).provenance
    assert prov.source_model == str(tiny_base) and prov.conversions[0]["calibration"] is None  # svd: none used


def test_convert_refuses_a_directory_it_does_not_own_and_replaces_a_checkpoint_only_when_asked(
        invoke, tiny_base, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("chapter 1")
    args = ["convert", "--model", tiny_base, "--attention", "decoder.*=mha", "--quiet"]
    result = invoke(*args, "--out", mine, "--overwrite")
    assert result.exit_code == 1 and "not an mla-registry checkpoint" in result.output
    assert (mine / "thesis.tex").read_text() == "chapter 1"
    assert invoke(*args, "--out", tmp_path / "c").exit_code == 0
    again = invoke(*args, "--out", tmp_path / "c")
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert invoke(*args, "--out", tmp_path / "c", "--overwrite").exit_code == 0


def test_convert_bad_input_is_one_line(invoke, tiny_base, tmp_path):
    cases = {
        ("--attention", "decoder.*=mla:rank=999"): "allowed values: 1..64",
        ("--attention", "decoder.crosss=mha"): "matches no attention slot",
        ("--attention", "decoder.*=nosuch"): "no attention plugin named 'nosuch'",
        ("--attention", "decoder.*=mla:rank=8", "--calibration-size", "0"): "calibration-size",
        ("--attention", "decoder.*=mha", "--device", "quantum"): "not a torch device",
        ("--attention", "decoder.*=mha", "--dtype", "float8"): "float8",
    }
    for extra, message in cases.items():
        result = invoke("convert", "--model", tiny_base, "--out", tmp_path / "x", "--quiet", *extra)
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
        assert "Traceback" not in result.output
