"""Smoke test of bench/decode.py: every code path (forced and natural decoding, step clock, cache and floor
figures, peak memory, ratios, CTranslate2 row, table, JSON) on the bundled model with tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "decode.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_variant_parsing(tmp_path):
    bench = load_bench()
    v = bench.parse_variant("mla=decoder.self=mla:rank=8,init=svd;decoder.cross=gqa:kv_heads=1")
    assert v.name == "mla" and v.specs == ["decoder.self=mla:rank=8,init=svd", "decoder.cross=gqa:kv_heads=1"]
    assert bench.parse_variant("stock").specs == []
    config = tmp_path / "v.yaml"
    config.write_text("variants:\n  stock: []\n  g: {specs: ['decoder.*=gqa:kv_heads=2'], batch_sizes: [1]}\n")
    loaded = bench.load_config(str(config))
    assert [(x.name, x.specs, x.batch_sizes) for x in loaded] == [
        ("stock", [], None), ("g", ["decoder.*=gqa:kv_heads=2"], [1])]
    with pytest.raises(SystemExit, match="variant 'bad'"):
        bench.variants_from_mapping({"bad": {"plugin": "mla"}})


def test_benchmark_smoke(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    report = bench.main([
        "--batch-sizes", "1,2", "--steps", "3", "--reps", "1", "--natural-max", "4", "--clips", "2",
        "--threads", "1", "--quiet", "--json", str(out),
        "--variant", "stock", "--variant", "gqa2=decoder.*=gqa:kv_heads=2",
        "--variant", "mla=decoder.*=mla:rank=32,init=svd",
    ])
    printed = capsys.readouterr().out
    assert "step/floor" in printed and "gqa2" in printed
    assert json.loads(out.read_text())["results"]
    rows = {(r["variant"], r["batch"]): r for r in report["results"]}
    for name in ("stock", "gqa2", "mla"):
        for batch in (1, 2):
            r = rows[(name, batch)]
            assert r["forced_steps"] == 3 and r["forced_tok_s"] > 0 and r["ms_per_step"] > 0
            assert r["floor_ms"] > 0 and r["step_over_floor"] > 0 and r["natural_tokens"] >= batch
            assert r["peak_memory_bytes"] is not None
    stock, mla = rows[("stock", 2)], rows[("mla", 2)]
    assert stock["forced_vs_stock"] == 1.0
    # the cache really held: MLA rank 32 caches 32 values per token where MHA caches 2 * 384
    assert mla["kv_cross_bytes_per_utterance"] * 24 == stock["kv_cross_bytes_per_utterance"]
    assert mla["max_batch_in_budget"] > stock["max_batch_in_budget"]
    if "ctranslate2" in {v for v, _ in rows}:
        assert rows[("ctranslate2", 2)]["forced_steps"] == 3
    else:
        assert any("CTranslate2 row skipped" in n for n in report["notes"])
