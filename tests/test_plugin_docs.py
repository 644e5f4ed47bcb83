"""The README's "Writing an attention plugin" runs as written, and documents every hook specification."""

import ast
import re
from pathlib import Path

import tomllib
import torch
from click.testing import CliRunner

from mla_registry import checkpoint, hookspecs, kvcache, registry, surgery, testing
from mla_registry.cli.main import cli

README = (Path(__file__).parents[1] / "README.md").read_text()


def _example():
    block = README.split("<!-- plugin-example:start -->")[1].split("<!-- plugin-example:end -->")[0]
    python = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    toml = re.search(r"```toml\n(.*?)```", block, re.S).group(1)
    return python, tomllib.loads(toml)["project"]["entry-points"]["mla_registry"]


def test_every_hookspec_is_documented_in_the_readme():
    section = README.split("### Hook specifications")[1]
    specs = [n.name for n in ast.parse(Path(hookspecs.__file__).read_text()).body
             if isinstance(n, ast.FunctionDef) and any("hookspec" in ast.unparse(d) for d in n.decorator_list)]
    assert specs, "no hook specifications found"
    for name in specs:
        assert f"`{name}(" in section, f"hook {name} is not documented in README.md"
        assert getattr(hookspecs, name).__doc__, f"hook {name} has no docstring"


def test_readme_plugin_is_listed_converted_saved_and_reloaded(install_plugin, tiny_model, tmp_path):
    python, entry_points = _example()
    assert entry_points == {"mqa": "mla_registry_mqa"}
    install_plugin("mla-registry-mqa", entry_points, {"mla_registry_mqa": python})

    listed = CliRunner().invoke(cli, ["plugins"])
    assert listed.exit_code == 0, listed.output
    assert "mqa  (plugin version 1; from mla-registry-mqa 1.0)" in listed.output and "pool" in listed.output

    model = tiny_model()
    records = surgery.replace_slots(model, [surgery.parse_spec("decoder.*=mqa:pool=first")], context=None)
    assert {r.plugin for r in records} == {"mqa"} and records[0].package == "mla-registry-mqa 1.0"
    assert records[0].kwargs == {} and records[0].convert_kwargs == {"pool": "first"}
    feats = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(feats, max_new_tokens=6, return_dict_in_generate=True)
    head_dim = 64 // 4
    assert kvcache.measure(out.past_key_values).self_per_token == 2 * (2 * head_dim * 4)

    checkpoint.save(model, tmp_path / "mqa")
    reloaded = checkpoint.load(tmp_path / "mqa")
    assert type(reloaded.get_submodule(records[0].path)).__name__ == "MultiQueryAttention"
    with torch.no_grad():
        again = reloaded.generate(feats, max_new_tokens=6)
    assert torch.equal(out.sequences[:, -again.shape[1]:], again)  # generate() alone drops the prompt

    # export: no stock form (the example keeps to_stock()'s default), so the stock formats refuse by name
    from mla_registry.errors import ExportError
    from mla_registry.export import export

    for fmt in ("transformers", "ctranslate2"):
        try:
            export(tmp_path / "mqa", fmt, tmp_path / f"mqa-{fmt}")
        except ExportError as exc:
            assert "attention 'mqa' (mla-registry-mqa 1.0)" in str(exc) and "to_stock" in str(exc)
        else:
            raise AssertionError(f"--to {fmt} must refuse a plugin without a stock form")
    # ... while --to onnx traces the plugin's own module: ONNX Runtime decodes the same tokens over one K/V head
    from mla_registry import model_refs
    from mla_registry.export.onnx import write_onnx
    from mla_registry.export.ort import OrtWhisper

    (tmp_path / "mqa-onnx").mkdir()
    write_onnx(reloaded, model_refs.load_processor("bundled:whisper-tiny.en"), tmp_path / "mqa-onnx")
    runtime = OrtWhisper(tmp_path / "mqa-onnx", threads=1)
    rows = runtime.generate(runtime.encode(feats.numpy()), 6)
    cut = lambda r: r[:r.index(50256)] if 50256 in r else r  # noqa: E731
    assert [cut(r[2:]) for r in rows] == [cut(r) for r in again.tolist()]
    assert runtime.last_cache.shapes["self.0.key"][1] == 1 and runtime.last_cache.self_per_token == 2 * (2 * 16 * 4)

    # without the plugin installed, the error names the plugin and quotes the package the manifest claims
    # (as the manifest's claim: never a pip command built from a checkpoint's words)
    registry.reset()
    registry.get_registry().builders.pop("mqa")
    try:
        checkpoint.load(tmp_path / "mqa")
    except Exception as exc:  # noqa: BLE001
        assert "'mqa'" in str(exc) and "manifest says it came from the package 'mla-registry-mqa 1.0'" in str(exc)
        assert "pip install" not in str(exc)
    else:
        raise AssertionError("loading without the plugin must fail")


def test_readme_plugin_passes_the_conformance_kit(install_plugin):
    """What the plugin guide tells a third party to run, run on the guide's own plugin (a fresh-process round
    trip included: the plugin is installed through its entry point)."""
    python, entry_points = _example()
    install_plugin("mla-registry-mqa", entry_points, {"mla_registry_mqa": python})
    builder = registry.get_builder("mqa")
    results = testing.check_plugin(builder, [{"pool": "mean"}, {"pool": "first"}],
                                   checks=tuple(c for c in testing.CHECKS if c != "equivalences"))
    assert results["mqa(pool=mean): roundtrip"] == "ok" and results["mqa(pool=first): cache"] == "ok"
