"""bench/decode.py on the bundled model with tiny sizes: every code path (both decoders, forced and natural
decoding, step clock, cache and floor figures, peak memory, ratios, end-to-end and CTranslate2 rows, table,
JSON), with assertions on the figures themselves."""

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


def test_step_flops_are_every_matmul_and_attention_of_one_step():
    """The arithmetic floor's count for the stock model equals the step's matmuls worked out by hand: 32 decoder
    linears, the output projection (a prepacked oneDNN call) and attention over 1500 frames and the self cache
    (CPU SDPA), at batch 2."""
    import torch

    sys.path.insert(0, str(BENCH.parent))
    import measure

    from mla_registry import decoding, whisper
    from mla_registry import model_refs as models

    model, _ = models.load("bundled:whisper-tiny.en")
    model.eval()
    batch, d, frames = 2, 384, 1500
    hidden = torch.randn(batch, frames, d)
    self_len = len(whisper.prompt_ids(model)) + 1
    linears = 4 * (6 * d * d + 2 * d * 1536)
    attention = 4 * 2 * 2 * batch * 6 * 64 * (frames + self_len)
    expected = 2 * batch * linears + 2 * batch * model.proj_out.out_features * d + attention
    assert measure.step_flops(model, hidden, decoding.DecoderStep(model)) == expected


def test_benchmark_smoke(tmp_path, capsys):
    """Tiny sizes through every code path; what is asserted is what a regression would break: the loop's tokens
    equal generate()'s, ratios are the ratios of the rows they name, the caches are the sizes the plugins
    promise, the floor is bytes over bandwidth, end-to-end rows decode every clip, no machine path is printed."""
    bench = load_bench()
    out = tmp_path / "bench.json"
    report = bench.main([
        "--batch-sizes", "1,2", "--steps", "3", "--reps", "1", "--natural-max", "4", "--clips", "2",
        "--e2e-clips", "3", "--e2e-batch-sizes", "1,2", "--threads", "1", "--quiet", "--json", str(out),
        "--variant", "stock", "--variant", "gqa2=decoder.*=gqa:kv_heads=2",
        "--variant", "mla=decoder.*=mla:rank=32,init=svd",
    ])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["results"]
    rows = {(r["variant"], r["decoder"], r["batch"]): r for r in report["results"]}
    for name in ("stock", "gqa2", "mla"):
        for batch in (1, 2):
            loop, gen = rows[(name, "loop", batch)], rows[(name, "generate", batch)]
            assert loop["tokens_match_generate"] is True, (name, batch)
            for r in (loop, gen):
                assert r["forced_steps"] == 3 and r["natural_tokens"] >= batch and r["peak_memory_bytes"] is not None
                assert r["floor_ms"] == pytest.approx(1e3 * r["step_bytes"] / (
                    report["machine"]["memory_bandwidth_gb_s"] * 1e9))
                assert r["step_bytes"] > r["weight_bytes"] + r["kv_cross_bytes_per_utterance"] * batch - 1
                assert r["flop_floor_ms"] == pytest.approx(1e3 * r["step_flops"] / (
                    report["machine"]["matmul_gflop_s"] * 1e9))
                assert r["step_over_roofline"] == pytest.approx(
                    r["ms_per_step"] / max(r["floor_ms"], r["flop_floor_ms"]))
            # both decoders hold the same cache (the loop reports it per sample, generate's is measured at the end)
            assert loop["kv_cross_bytes_per_utterance"] == gen["kv_cross_bytes_per_utterance"]
            assert loop["kv_self_bytes_per_token"] == pytest.approx(gen["kv_self_bytes_per_token"])
            assert loop["loop_vs_generate"] == pytest.approx(loop["forced_tok_s"] / gen["forced_tok_s"])
            stock = rows[("stock", "loop", batch)]
            assert loop["forced_vs_stock"] == pytest.approx(loop["forced_tok_s"] / stock["forced_tok_s"])
    stock, mla = rows[("stock", "loop", 2)], rows[("mla", "loop", 2)]
    # the cache really held: MLA rank 32 caches 32 values per token where MHA caches 2 * 384
    assert mla["kv_cross_bytes_per_utterance"] * 24 == stock["kv_cross_bytes_per_utterance"]
    assert rows[("gqa2", "loop", 2)]["kv_cross_bytes_per_utterance"] * 3 == stock["kv_cross_bytes_per_utterance"]
    assert mla["max_batch_in_budget"] > stock["max_batch_in_budget"]
    e2e = {(r["variant"], r["decoder"], r["batch"]): r for r in report["end_to_end"]}
    assert {k[:2] for k in e2e} >= {("stock", "loop"), ("stock", "generate"), ("gqa2", "loop"), ("mla", "loop")}
    for r in e2e.values():
        assert r["utterances"] == 3 and r["tokens"] >= 3
        assert r["utt_s"] == pytest.approx(3 / (r["encoder_s"] + r["decode_s"]))
    for batch in (1, 2):  # same tokens, so the same count, through either decoder
        assert e2e[("stock", "loop", batch)]["tokens"] == e2e[("stock", "generate", batch)]["tokens"]
    assert [t["target"] for t in report["targets"]] and "Targets" in printed and "End to end" in printed
    assert str(Path(__file__).resolve().parents[1]) not in printed  # no machine path in what gets pasted
    if any(r["variant"] == "ctranslate2" for r in report["results"]):
        assert rows[("ctranslate2", "ctranslate2", 2)]["forced_steps"] == 3
        ct2 = e2e[("ctranslate2", "ctranslate2", 2)]
        assert ct2["same_tokens_as_loop"] == 3 and "vs_ct2" in e2e[("stock", "loop", 2)]
    else:
        assert any("CTranslate2 row skipped" in n for n in report["notes"])
    if not any(r["decoder"] == "onnxruntime" for r in report["results"]):
        assert any("ONNX Runtime rows skipped" in n for n in report["notes"])
        return
    for name in ("stock", "gqa2", "mla"):  # each variant's ONNX export, decoded by ONNX Runtime
        for batch in (1, 2):
            onnx, loop = rows[(name, "onnxruntime", batch)], rows[(name, "loop", batch)]
            assert onnx["tokens_match_generate"] is True and onnx["forced_steps"] == 3, (name, batch)
            # the export passes the plugin's own cache: the same bytes the PyTorch modules hold
            assert onnx["kv_cross_bytes_per_utterance"] == loop["kv_cross_bytes_per_utterance"]
            assert onnx["kv_self_bytes_per_token"] == pytest.approx(loop["kv_self_bytes_per_token"])
            assert onnx["forced_vs_stock"] == pytest.approx(
                onnx["forced_tok_s"] / rows[("stock", "onnxruntime", batch)]["forced_tok_s"])
        assert e2e[(name, "onnxruntime", 2)]["same_tokens_as_loop"] == 3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's
def test_compiled_loop_rows(tmp_path):
    """--compile adds a loop+compile row beside each loop row: generate()'s tokens, its ratio to the plain loop
    from the two rows, and what compiling cost in the notes."""
    bench = load_bench()
    report = bench.main([
        "--batch-sizes", "1,2", "--steps", "3", "--reps", "1", "--natural-max", "4", "--clips", "2",
        "--e2e-clips", "0", "--threads", "1", "--quiet", "--json", "", "--no-memory", "--no-ct2", "--no-ort",
        "--variant", "stock", "--compile",
    ])
    rows = {(r["variant"], r["decoder"], r["batch"]): r for r in report["results"]}
    for batch in (1, 2):
        compiled, plain = rows[("stock", bench.COMPILED, batch)], rows[("stock", "loop", batch)]
        assert compiled["tokens_match_generate"] is True and compiled["forced_steps"] == 3
        assert compiled["compiled_vs_loop"] == pytest.approx(compiled["forced_tok_s"] / plain["forced_tok_s"])
        assert compiled["compile_s"] > 0 and "compiled_vs_loop" not in plain
    assert any(n.startswith("loop+compile:") and "stock b2" in n for n in report["notes"])
