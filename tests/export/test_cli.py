"""``mla-registry export``: writes the format asked for, says what the cache becomes, refuses what it must."""

from __future__ import annotations

from click.testing import CliRunner

from mla_registry.cli.main import cli
from mla_registry.export import PROVENANCE


def test_export_command_says_the_cache_saving_is_lost(export_ckpts, tmp_path):
    out = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["export", str(export_ckpts["gqa"]), "--to", "transformers", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "cache saving is not kept" in result.output and (out / PROVENANCE).is_file()
    again = CliRunner().invoke(cli, ["export", str(export_ckpts["gqa"]), "--to", "transformers", "--out", str(out)])
    assert again.exit_code != 0 and "--overwrite" in again.output
    bad = CliRunner().invoke(cli, ["export", str(export_ckpts["gqa"]), "--to", "onnx", "--quantization", "int8",
                                   "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "only --to ctranslate2 quantizes" in bad.output
