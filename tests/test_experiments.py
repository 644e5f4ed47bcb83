"""experiments.yaml end to end on a tiny random-weight Whisper: validation errors name file, line and key;
every variant is rebuilt from its checkpoint; an interrupted run resumes to identical results."""

import json
import textwrap

import pytest

from mla_registry import checkpoint, experiments, models, runner
from mla_registry.errors import ExperimentError

TEST_DATA = "builtin:real?source=librispeech_test_clean"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_model):
    """A tiny random-weight Whisper saved with the bundled model's processor (a real tokenizer)."""
    path = tmp_path_factory.mktemp("base") / "tiny"
    checkpoint.save(tiny_model(), path, models.load_processor("bundled:whisper-tiny.en"))
    return path


def write_yaml(tmp_path, base, variants: str, extra: str = "") -> str:
    text = textwrap.dedent(f"""\
        name: tiny
        output_dir: {tmp_path / 'runs'}
        base_model: {base}
        data:
          test: "{TEST_DATA}"
        decoding: {{batch_size: 2, max_new_tokens: 6}}
        """) + extra + "variants:\n" + textwrap.indent(textwrap.dedent(variants), "  ")
    (tmp_path / "exp.yaml").write_text(text)
    return str(tmp_path / "exp.yaml")


VARIANTS = """\
- name: base
- name: gqa-2
  attention:
    decoder.*: gqa:kv_heads=2
- name: mla-16
  attention:
    decoder.self: {plugin: mla, rank: 16, init: svd}
    decoder.cross: mla:rank=24,init=svd
"""


def test_run_resume_and_report(tmp_path, tiny_base, monkeypatch):
    path = write_yaml(tmp_path, tiny_base, VARIANTS)
    exp = experiments.load(path)
    assert [v.name for v in exp.variants] == ["base", "gqa-2", "mla-16"] and exp.baseline == "base"

    # interrupt the run while the third variant evaluates
    real_evaluate = runner.evaluate
    calls = []

    def flaky(model, *a, **k):
        calls.append(k["extra"]["variant"])
        if k["extra"]["variant"] == "mla-16" and calls.count("mla-16") == 1:
            raise KeyboardInterrupt
        return real_evaluate(model, *a, **k)

    monkeypatch.setattr(runner, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        runner.run(exp, quiet=True)
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "gqa-2" / "metrics.json").exists()
    assert not (run_dir / "mla-16" / "metrics.json").exists()
    assert (run_dir / "mla-16" / "checkpoint" / checkpoint.MANIFEST).exists()

    results = runner.run(exp, quiet=True)  # resume: only mla-16 is evaluated again
    assert calls == ["base", "gqa-2", "mla-16", "mla-16"]
    assert [v["name"] for v in results["variants"]] == ["base", "gqa-2", "mla-16"]
    for name in ("gqa-2", "mla-16"):  # evaluated on the checkpoint rebuilt from disk
        assert results["variants"][[v["name"] for v in results["variants"]].index(name)]["metrics"]["model"] == \
            str(run_dir / name / "checkpoint")
    mla = json.loads((run_dir / "mla-16" / "metrics.json").read_text())
    assert mla["attention"]["decoder.cross"] == "mla(rank=24)"
    assert mla["kv_cross_bytes_per_utterance"] == 2 * 24 * 4 * 1500  # 2 layers, rank 24, fp32, 1500 frames
    assert (run_dir / "report.md").exists() and (run_dir / "report.csv").exists()
    assert "gqa-2" in (run_dir / "report.md").read_text()

    # an uninterrupted run from scratch gives identical per-utterance results
    fresh = runner.run(experiments.load(path), force=True, quiet=True)
    # the three variants share one encoder (recognised by its weights): it ran once per batch of 2 utterances
    assert fresh["encoder_reuse"] == {"computed_batches": 2, "reused_batches": 4}
    for a, b in zip(results["variants"], fresh["variants"]):
        assert a["metrics"]["wer"] == b["metrics"]["wer"]
        assert (run_dir / a["name"] / "predictions.jsonl").read_text() == \
            (run_dir / b["name"] / "predictions.jsonl").read_text()


def test_errors_name_file_line_and_key(tmp_path, tiny_base):
    bad = """\
- name: a
  attention:
    decoder.*: mla:rank=16,init=pca
- name: a
  attention:
    decoder.crosss: gqa:kv_heads=2
- name: b
  atention: {}
- name: c
  attention:
    decoder.self: nosuch:rank=3
"""
    path = write_yaml(tmp_path, tiny_base, bad, extra="decoding: {beams: 2}\n")
    with pytest.raises(ExperimentError) as err:
        experiments.load(path)
    msg = str(err.value)
    assert "exp.yaml:11: variants[0].attention.decoder.*:" in msg and "allowed values: activation, svd" in msg
    assert "exp.yaml:12: variants[1].name: duplicate variant name 'a'" in msg
    assert "variants[2].atention: unknown key 'atention'" in msg
    assert "variants[3].attention.decoder.self:" in msg and "no attention plugin named 'nosuch'" in msg
    assert "unknown key 'beams'" in msg  # the second 'decoding' mapping wins in YAML


def test_selector_and_data_errors(tmp_path, tiny_base):
    path = write_yaml(tmp_path, tiny_base, "- name: a\n  attention:\n    decoder.crosss: gqa:kv_heads=2\n")
    with pytest.raises(ExperimentError, match=r"variants\[0\]\.attention\.decoder\.crosss: .*available"):
        experiments.load(path)
    path = write_yaml(tmp_path, tiny_base, "- name: a\n")
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text(yaml_file.read_text().replace(TEST_DATA, str(tmp_path / "nowhere")))
    with pytest.raises(ExperimentError, match=r"exp.yaml:5: data.test: dataset .*nowhere.* is not readable"):
        experiments.load(path)


def test_default_experiment_file_is_valid():
    from pathlib import Path

    exp = experiments.load(Path(__file__).parents[1] / "experiments.yaml", check_data=False)
    assert exp.baseline in [v.name for v in exp.variants]
