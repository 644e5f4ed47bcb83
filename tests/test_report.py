import csv
import io
import json

import pytest
from click.testing import CliRunner

from mla_registry import normalize, report, scoring
from mla_registry.errors import ExperimentError

REFS = ["the cat sat on the mat", "a quick brown fox", "hello world again", "one two three four",
        "she sells sea shells", "red lorry yellow lorry"]
VOICES = ["alba", "bryn", "alba", "bryn", "alba", "bryn"]
SOURCES = ["tts", "tts", "tts", "real", "real", "real"]
HYPS = {
    "mha": ["the cat sat on the mat", "a quick brown box", "hello world again", "one two three four",
            "she sells sea shells", "red lorry yellow lorry"],
    "mla192": ["the cat sat on a mat", "a quick brown box", "hello word again", "one two three",
               "she sells sea shells", "red lorry yellow lorry"],
    "gqa2": ["the cat sat", "a quick box", "hello world", "one two tree for", "he sells shells",
             "red lolly yellow lolly"],
}
ATTN = {
    "mha": {"encoder.self": "stock", "decoder.self": "stock", "decoder.cross": "stock"},
    "mla192": {"encoder.self": "stock", "decoder.self": "mla(rank=192)", "decoder.cross": "mla(rank=192)"},
    "gqa2": {"encoder.self": "gqa(groups=2)", "decoder.self": "gqa(groups=2)", "decoder.cross": "stock"},
}
KV = {"mha": (6144, 4_608_000), "mla192": (1536, 1_152_000), "gqa2": (3072, 4_608_000)}
VALID = {"mha": None, "mla192": 0.52, "gqa2": 0.61}  # the fine-tune's best validation loss
VALID_CE = {"mha": 0.31, "mla192": 0.47, "gqa2": 2.20}  # the run's validation CE, every variant


def _records(name):
    return [{"id": f"u{i}", "voice": VOICES[i], "source": SOURCES[i], "reference": ref, "hypothesis": hyp,
             **scoring.score_utterance(ref, hyp)} for i, (ref, hyp) in enumerate(zip(REFS, HYPS[name]))]


def _metrics(name, records):
    return {**scoring.totals(records), "by_voice": scoring.by_group(records, "voice"),
            "by_source": scoring.by_group(records, "source"), "normalizer": normalize.name(),
            "parameters": 37_760_000 if name != "mla192" else 36_100_000, "attention": ATTN[name],
            "kv_self_bytes_per_token": KV[name][0], "kv_cross_bytes_per_utterance": KV[name][1],
            "decode_tokens_per_second": 250.0, "real_time_factor": 0.05, "generated_tokens": 60,
            "decode_seconds": 0.24, "encoder_seconds": 0.1, "audio_seconds": 20.0}


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as the experiments runner writes it: 3 variants, 6 utterances each."""
    root = tmp_path / "runs" / "default"
    variants = []
    for name in HYPS:
        recs = _records(name)
        m = _metrics(name, recs)
        d = root / name
        d.mkdir(parents=True)
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "metrics.json").write_text(json.dumps(m))
        variants.append({"name": name, "source": "bundled:whisper-tiny.en", "attention": ATTN[name],
                         "finetuned": VALID[name] is not None, "valid_ce": VALID_CE[name],
                         "valid_loss": VALID[name], "finetune_objective": "ce+distill" if VALID[name] else None,
                         "dir": name, "metrics": m})
    results = {"experiment": "default", "base_model": "bundled:whisper-tiny.en", "baseline": "mha",
               "data": {"test": {"ref": "builtin:tts-test"},
                        "validation": {"ref": "builtin:tts-valid", "utterances": 104}},
               "decoding": {"batch_size": 16, "num_beams": 1, "max_new_tokens": 128}, "variants": variants}
    (root / "results.json").write_text(json.dumps(results))
    return root


def _edit_results(run_dir, fn):
    path = run_dir / "results.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_comparison_rows(run_dir):
    rows = {r["variant"]: r for r in report.comparison_rows(run_dir)}
    assert list(rows) == ["mha", "mla192", "gqa2"]
    assert rows["mha"]["attention"] == "self=stock cross=stock"
    assert rows["mla192"]["attention"] == "self=mla(rank=192) cross=mla(rank=192)"
    assert rows["gqa2"]["attention"] == "enc.self=gqa(groups=2) self=gqa(groups=2) cross=stock"
    assert rows["mla192"]["kv_self"] == "1536" and rows["mla192"]["kv_self_rel"] == "25.0%"
    assert rows["mla192"]["kv_cross"] == "1.15 MB" and rows["mla192"]["kv_cross_rel"] == "25.0%"
    assert rows["mha"]["kv_cross"] == "4.61 MB" and rows["mha"]["kv_cross_rel"] == "100.0%"
    assert rows["mha"]["params"] == "37.76 M"
    assert rows["mha"]["delta_wer"] == "baseline" and rows["mha"]["p_improve"] == ""
    assert rows["mha"]["valid_loss"] == "" and rows["mla192"]["valid_loss"] == "0.5200"
    assert rows["mha"]["valid_ce"] == "0.3100" and rows["gqa2"]["valid_ce"] == "2.2000"
    m = json.loads((run_dir / "mla192" / "metrics.json").read_text())
    assert rows["mla192"]["wer"] == report.pct(m["wer"])
    assert rows["mla192"]["sdi"] == f"{m['substitutions']}/{m['deletions']}/{m['insertions']}"
    # the worse variants: ΔWER positive, printed with a true minus sign where negative
    base_wer = json.loads((run_dir / "mha" / "metrics.json").read_text())["wer"]
    assert rows["mla192"]["delta_wer"].startswith(f"{100 * (m['wer'] - base_wer):+.2f} [")
    assert "-" not in rows["gqa2"]["delta_wer"]  # unicode minus, never a hyphen
    assert 0 <= float(rows["gqa2"]["p_improve"]) < 0.1
    assert rows["mha"]["tokens_per_s"] == "250.0" and rows["mha"]["rtf"] == "0.050"


@pytest.mark.parametrize("fmt", report.FORMATS)
def test_comparison_table_formats(run_dir, fmt):
    out = report.comparison_table(run_dir, fmt)
    for name in HYPS:
        assert name in out
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(out)))
        assert rows[0][0] == "variant" and "dWER pp [95% CI]" in rows[0] and len(rows) == 4
        assert all(len(r) == len(rows[0]) for r in rows)
        assert "−" not in out and "Δ" not in out
    elif fmt == "latex":
        assert "\\begin{tabular}" in out and "−" not in out and "Δ" not in out and "\\%" in out
    elif fmt == "github":
        assert out.splitlines()[1].startswith("|-") and "ΔWER" in out
    else:
        assert "ΔWER" in out


def test_unknown_format(run_dir):
    with pytest.raises(ValueError, match="html"):
        report.comparison_table(run_dir, "html")


@pytest.mark.parametrize("fmt", report.FORMATS)
def test_group_tables(run_dir, fmt):
    voice = report.group_table(run_dir, "voice", fmt)
    source = report.group_table(run_dir, "source", fmt)
    assert "alba (3)" in voice and "bryn (3)" in voice
    assert "real (3)" in source and "tts (3)" in source
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(source)))
        assert rows[0] == ["source (utts)", "mha", "mla192", "gqa2"]
        assert [r[0] for r in rows[1:]] == ["real (3)", "tts (3)"]
        m = json.loads((run_dir / "gqa2" / "metrics.json").read_text())
        assert rows[1][3] == report.pct(m["by_source"]["real"]["wer"])
    with pytest.raises(ValueError):
        report.group_table(run_dir, "speaker", fmt)


def test_footer(run_dir):
    lines = report.footer_lines(run_dir)
    text = "\n".join(lines)
    assert "n/a: fewer than 3 fine-tuned variants" in text
    assert normalize.name() in text and "builtin:tts-test" in text and "num_beams=1" in text
    assert "1000 resamples, seed 0" in text

    _edit_results(run_dir, lambda d: d["variants"][0].update(valid_loss=0.40))
    text = "\n".join(report.footer_lines(run_dir))
    # valid loss 0.40 < 0.52 < 0.61 and WER mha < mla192 < gqa2: perfect rank agreement
    assert "+1.000 over 3 fine-tuned variants" in text


def test_footer_ranks_validation_ce_over_every_variant(run_dir):
    text = "\n".join(report.footer_lines(run_dir))
    # CE 0.31 < 0.47 < 2.20 and WER mha < mla192 < gqa2; the untrained baseline is one of the rows
    assert "between validation CE and test WER: +1.000 over 3 of 3 variants (2 fine-tuned)" in text
    assert "fine-tune's best validation loss and test WER: n/a: fewer than 3 fine-tuned variants" in text
    assert "builtin:tts-valid (104 utterances)" in text and "own objective (ce+distill)" in text
    assert "| valid CE " in report.comparison_table(run_dir, "github")
    assert "FT valid loss" in report.comparison_table(run_dir, "github")

    def older(d):  # a row with the figure only in its metrics (as metrics.json keeps it), one without
        d["variants"][0]["metrics"]["valid_ce"] = d["variants"][0].pop("valid_ce")
        d["variants"][2].pop("valid_ce")

    _edit_results(run_dir, older)
    assert report.comparison_rows(run_dir)[0]["valid_ce"] == "0.3100"
    assert "validation CE and test WER: n/a: fewer than 3 variants have one" in "\n".join(
        report.footer_lines(run_dir))

    def no_valid(d):  # a run without data.valid
        for v in d["variants"]:
            v.pop("valid_ce", None), v["metrics"].pop("valid_ce", None)
        d["data"].pop("validation")

    _edit_results(run_dir, no_valid)
    assert "n/a: no validation CE (the run had no data.valid)" in "\n".join(report.footer_lines(run_dir))


def test_missing_baseline_leaves_delta_blank(run_dir):
    _edit_results(run_dir, lambda d: d.update(baseline="nope"))
    rows = report.comparison_rows(run_dir)
    assert all(r["delta_wer"] == "" and r["p_improve"] == "" for r in rows)
    assert all(r["kv_self_rel"] == "" for r in rows)
    assert "not among the variants" in "\n".join(report.footer_lines(run_dir))
    report.comparison_table(run_dir, "github")


def test_metrics_read_from_variant_dir_when_absent(run_dir):
    _edit_results(run_dir, lambda d: [v.pop("metrics") for v in d["variants"]])
    assert len(report.comparison_rows(run_dir)) == 3
    (run_dir / "gqa2" / "metrics.json").unlink()
    with pytest.raises(ExperimentError, match=r"gqa2[/\\]metrics.json: file not found"):
        report.load_run(run_dir)


def test_corrupt_results(run_dir):
    (run_dir / "results.json").write_text("{not json")
    with pytest.raises(ExperimentError, match="results.json: cannot read JSON"):
        report.comparison_table(run_dir)
    (run_dir / "results.json").write_text("[]")
    with pytest.raises(ExperimentError, match="results.json: expected an object"):
        report.load_run(run_dir)
    (run_dir / "results.json").unlink()
    with pytest.raises(ExperimentError, match="results.json: file not found"):
        report.load_run(run_dir)


def test_corrupt_or_mismatched_predictions(run_dir):
    path = run_dir / "mla192" / "predictions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ["{oops"] + lines[3:]) + "\n")
    with pytest.raises(ExperimentError, match=r"mla192[/\\]predictions.jsonl, line 3"):
        report.comparison_rows(run_dir)
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ExperimentError, match="only in base: u5"):
        report.comparison_rows(run_dir)
    path.unlink()
    with pytest.raises(ExperimentError, match="predictions.jsonl: file not found"):
        report.comparison_rows(run_dir)


def test_write_reports(run_dir):
    report.write_reports(run_dir)
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# default\n")
    assert "## Variants" in md and "## WER % by voice" in md and "## WER % by source" in md
    assert "| mla192" in md and "n/a: fewer than 3 fine-tuned variants" in md
    rows = list(csv.reader(io.StringIO((run_dir / "report.csv").read_text())))
    assert [r[0] for r in rows] == ["variant", "mha", "mla192", "gqa2"]
    assert not list(run_dir.glob(".*.tmp"))


def test_cli_report(run_dir):
    from mla_registry.cli.report import command

    res = CliRunner().invoke(command, [str(run_dir), "--format", "github", "--resamples", "200"])
    assert res.exit_code == 0, res.output
    assert "| mla192" in res.output and "WER % by voice" in res.output and "builtin:tts-test" in res.output
    assert not (run_dir / "report.md").exists()  # printing only
    help_ = CliRunner().invoke(command, ["--help"]).output
    assert "mla-registry report runs/default" in help_


def test_cli_report_error_is_clear(tmp_path):
    from mla_registry.cli.report import command

    res = CliRunner().invoke(command, [str(tmp_path)])
    assert res.exit_code != 0 and isinstance(res.exception, ExperimentError)
    assert "results.json" in str(res.exception)


def test_tradeoff_plot(run_dir):
    pytest.importorskip("matplotlib")
    from mla_registry.plot import pareto_front, tradeoff_plot

    out = tradeoff_plot(run_dir)
    assert out == run_dir / "tradeoff.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run_dir.glob(".tradeoff.*"))
    report.write_reports(run_dir)
    assert "tradeoff.png" in (run_dir / "report.md").read_text()
    # (bytes, wer): the baseline is dominated by the first point, the last beats it on WER with more bytes
    assert pareto_front([(1.0, 5.0), (2.0, 6.0), (3.0, 4.0), (1.0, 7.0)]) == [0, 2]


def test_loss_vs_wer_plot(run_dir):
    pytest.importorskip("matplotlib")
    from mla_registry.plot import loss_vs_wer_plot, tradeoff_plot

    out = loss_vs_wer_plot(run_dir)
    assert out == run_dir / "loss_vs_wer.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run_dir.glob(".loss_vs_wer.*"))
    tradeoff_plot(run_dir)
    report.write_reports(run_dir)
    assert "![WER against KV cache](tradeoff.png) ![validation CE against WER](loss_vs_wer.png)" in \
        (run_dir / "report.md").read_text()
    out.unlink()
    _edit_results(run_dir, lambda d: [v.pop("valid_ce") for v in d["variants"]])
    assert loss_vs_wer_plot(run_dir) is None and not out.exists()  # nothing to draw without data.valid


def test_kv_bytes_per_utterance():
    from mla_registry.plot import kv_bytes_per_utterance

    m = {"kv_cross_bytes_per_utterance": 1000, "kv_self_bytes_per_token": 10, "generated_tokens": 60,
         "utterances": 6}
    assert kv_bytes_per_utterance(m) == 1000 + 10 * 10
    assert kv_bytes_per_utterance({"kv_cross_bytes_per_utterance": 1}) is None


def test_tradeoff_plot_without_matplotlib(run_dir, monkeypatch):
    import builtins

    from mla_registry.plot import tradeoff_plot

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert tradeoff_plot(run_dir) is None
    assert not (run_dir / "tradeoff.png").exists()
    from mla_registry.plot import loss_vs_wer_plot

    assert loss_vs_wer_plot(run_dir) is None and not (run_dir / "loss_vs_wer.png").exists()
