"""experiments.yaml end to end on a tiny random-weight Whisper: validation errors name file, line and key;
every variant is rebuilt from its checkpoint; an interrupted run resumes to identical results."""

import json
import textwrap

import pytest

from mla_registry import checkpoint, experiments, model_refs, runner
from mla_registry.errors import ExperimentError

TEST_DATA = "builtin:real?source=librispeech_test_clean"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_model):
    """A tiny random-weight Whisper saved with the bundled model's processor (a real tokenizer)."""
    path = tmp_path_factory.mktemp("base") / "tiny"
    checkpoint.save(tiny_model(), path, model_refs.load_processor("bundled:whisper-tiny.en"))
    return path


def write_yaml(tmp_path, base, variants: str, extra: str = "", decoding: str = "batch_size: 2, max_new_tokens: 6",
               data: str = "") -> str:
    text = textwrap.dedent(f"""\
        name: tiny
        output_dir: {tmp_path / 'runs'}
        base_model: {base}
        data:
          test: "{TEST_DATA}"
        """) + data + f"decoding: {{{decoding}}}\n" + extra + "variants:\n" + textwrap.indent(
        textwrap.dedent(variants), "  ")
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
    reuse = fresh["encoder_reuse"]
    assert (reuse["computed_batches"], reuse["reused_batches"], reuse["recomputed_batches"]) == (2, 4, 0)
    for a, b in zip(results["variants"], fresh["variants"]):
        assert a["metrics"]["wer"] == b["metrics"]["wer"]
        assert (run_dir / a["name"] / "predictions.jsonl").read_text() == \
            (run_dir / b["name"] / "predictions.jsonl").read_text()


VALID_DATA = "builtin:real?source=cmu_arctic_samples"  # 10 clips, none of them a test clip
CE_VARIANTS = """\
- name: base
- name: mha
  attention: {decoder.*: mha}
- name: gqa-2
  attention: {decoder.*: 'gqa:kv_heads=2'}
- name: mla-ft
  attention: {decoder.*: 'mla:rank=16,init=svd'}
  finetune: {objective: ce, steps: 1, batch_size: 2, train_limit: 2, valid_limit: 2, warmup_steps: 0,
             valid: "builtin:real?source=librispeech_dev_clean"}
"""


def test_validation_ce_of_every_variant_and_its_resume(tmp_path, tiny_base, monkeypatch, reference_ce):
    from mla_registry import data

    sets = f'  train: "builtin:real?source=librispeech_dev_clean"\n  valid: "{VALID_DATA}"\n'
    path = write_yaml(tmp_path, tiny_base, CE_VARIANTS, data=sets)
    ce_calls, evaluated = [], []
    real_ce, real_evaluate = runner.validation_ce, runner.evaluate
    monkeypatch.setattr(runner, "validation_ce", lambda *a, **k: ce_calls.append(1) or real_ce(*a, **k))
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: evaluated.append(1) or real_evaluate(*a, **k))
    results = runner.run(experiments.load(path), quiet=True)
    run_dir = tmp_path / "runs" / "tiny"
    ce = {v["name"]: v["valid_ce"] for v in results["variants"]}
    assert len(ce_calls) == 4 and all(isinstance(x, float) for x in ce.values())
    utts = data.load(VALID_DATA, quiet=True)
    assert results["data"]["validation"]["utterances"] == len(utts) == 10
    # the stock model's own loss on the transcripts, and the exact MHA re-expression gives the same figure
    stock = reference_ce(model_refs.load_model(str(tiny_base)), model_refs.load_processor(str(tiny_base)), utts)
    assert ce["base"] == pytest.approx(stock, rel=1e-5) and ce["mha"] == pytest.approx(stock, rel=1e-4)
    tuned = next(v for v in results["variants"] if v["name"] == "mla-ft")
    assert tuned["finetuned"] and tuned["finetune_objective"] == "ce" and isinstance(tuned["valid_loss"], float)
    info = json.loads((run_dir / "gqa-2" / "metrics.json").read_text())["valid_ce_info"]
    assert info["ref"] == VALID_DATA and info["utterances"] == 10 and info["tokens"] > 10
    # one encoder for all four: 2 test + 5 validation batches computed once, reused by the other three
    reuse = results["encoder_reuse"]
    assert (reuse["computed_batches"], reuse["reused_batches"]) == (7, 21)
    md = (run_dir / "report.md").read_text()
    # (a random-weight model's WER is 100 % everywhere: no rank correlation, but every row counted)
    assert "validation CE and test WER: n/a: constant validation CE or test WER over 4 of 4 variants (1 " \
           "fine-tuned)" in md
    if results["tradeoff_png"]:  # matplotlib installed: the scatter is drawn beside the trade-off
        assert results["loss_vs_wer_png"] == str(run_dir / "loss_vs_wer.png")
        assert "(tradeoff.png) ![validation CE against WER](loss_vs_wer.png)" in md

    # a rerun recomputes nothing, except for a variant evaluated before validation CE existed: only its CE
    ce_calls.clear(), evaluated.clear()
    mpath = run_dir / "gqa-2" / "metrics.json"
    old = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({k: v for k, v in old.items() if not k.startswith("valid_ce")}))
    again = runner.run(experiments.load(path), quiet=True)
    assert (len(ce_calls), evaluated) == (1, [])
    assert json.loads(mpath.read_text())["valid_ce"] == old["valid_ce"] == again["variants"][2]["valid_ce"]
    # another validation set (the fine-tune keeps its own): every CE again, no WER again
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text(yaml_file.read_text().replace(VALID_DATA, "builtin:real?source=jfk"))
    ce_calls.clear()
    other = runner.run(experiments.load(path), quiet=True)
    assert (len(ce_calls), evaluated) == (4, [])
    assert all(v["metrics"]["valid_ce_info"]["utterances"] == 1 for v in other["variants"])

    # --force recomputes everything, the finished fine-tune included: its saved training state is not resumed
    from mla_registry.finetune import loop

    steps = []
    real_step = loop.Trainer.train_step
    monkeypatch.setattr(loop.Trainer, "train_step", lambda self, *a: steps.append(a[1]) or real_step(self, *a))
    forced = runner.run(experiments.load(path), force=True, quiet=True)
    assert steps == [0] and len(evaluated) == 4
    assert forced["variants"][3]["metrics"]["wer"] == other["variants"][3]["metrics"]["wer"]


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
    path = write_yaml(tmp_path, tiny_base, bad, decoding="batch_size: 2, beams: 2")
    with pytest.raises(ExperimentError) as err:
        experiments.load(path)
    msg = str(err.value)
    assert "exp.yaml:10: variants[0].attention.decoder.*:" in msg and "allowed values: activation, svd" in msg
    assert "exp.yaml:11: variants[1].name: duplicate variant name 'a'" in msg
    assert "variants[2].atention: unknown key 'atention'" in msg
    assert "variants[3].attention.decoder.self:" in msg and "no attention plugin named 'nosuch'" in msg
    assert "exp.yaml:6: decoding.beams: unknown key 'beams'" in msg


def test_selector_and_data_errors(tmp_path, tiny_base):
    path = write_yaml(tmp_path, tiny_base, "- name: a\n  attention:\n    decoder.crosss: gqa:kv_heads=2\n")
    with pytest.raises(ExperimentError, match=r"variants\[0\]\.attention\.decoder\.crosss: .*available"):
        experiments.load(path)
    path = write_yaml(tmp_path, tiny_base, "- name: a\n")
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text(yaml_file.read_text().replace(TEST_DATA, str(tmp_path / "nowhere")))
    with pytest.raises(ExperimentError, match=r"exp.yaml:5: data.test: dataset .*nowhere.* is not readable"):
        experiments.load(path)


def test_the_shipped_experiment_files_are_valid():
    """Every YAML this repository ships loads, with its datasets, against the bundled model's slots."""
    from pathlib import Path

    root = Path(__file__).parents[1]
    for path in [root / "experiments.yaml", *sorted((root / "bench").glob("*.yaml"))]:
        exp = experiments.load(path)
        assert exp.variants and all(v.name for v in exp.variants), path


def test_changing_decoding_re_evaluates_without_re_converting(tmp_path, tiny_base, monkeypatch):
    variants = "- name: base\n- name: mla\n  attention: {decoder.*: 'mla:rank=8,init=svd'}\n"
    path = write_yaml(tmp_path, tiny_base, variants)
    runner.run(experiments.load(path), quiet=True)
    conversions = []
    real = runner.convert_model
    monkeypatch.setattr(runner, "convert_model", lambda *a, **k: conversions.append(1) or real(*a, **k))
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("max_new_tokens: 6", "max_new_tokens: 4"))
    results = runner.run(experiments.load(path), quiet=True)
    assert conversions == []  # the checkpoint's build fingerprint still matches
    assert all(v["metrics"]["decoding"]["max_new_tokens"] == 4 for v in results["variants"])
    yaml_file.write_text(yaml_file.read_text().replace("rank=8", "rank=12"))
    runner.run(experiments.load(path), quiet=True)
    assert conversions == [1]


BAD_SETTINGS = [  # (YAML fragment replacing the decoding/data lines, expected message)
    ("data:\n  test: \"{data}\"\n  limit: -3\n", "data.limit: -3: must be at least 1"),
    ("data:\n  test: \"{data}\"\n  limit: 0\n", "data.limit: 0: must be at least 1"),
    ("data:\n  test: \"{data}\"\ndevice: quantum\n", "device: 'quantum': not a torch device"),
    ("data:\n  test: \"{data}\"\ndtype: float8\n", "dtype: 'float8' is not allowed"),
    ("data:\n  test: \"{data}\"\ndecoding: {{max_new_tokens: 100000}}\n",
     "decoding.max_new_tokens: 100000: must be between 1 and 448"),
    ("data:\n  test: \"{data}\"\ndecoding: {{max_new_tokens: 447}}\n", "decoder holds 448 positions, 446 after"),
    ("data:\n  test: \"{data}\"\ndecoding: {{batch_size: 0}}\n", "decoding.batch_size: 0: must be between"),
    ("data:\n  test: \"{data}\"\n  calibration_size: 0\n", "data.calibration_size: 0: must be at least 1"),
]


@pytest.mark.parametrize("fragment,message", BAD_SETTINGS)
def test_check_rejects_what_a_run_would_reject(tmp_path, tiny_base, fragment, message):
    text = f"base_model: {tiny_base}\n" + fragment.format(data=TEST_DATA) + "variants:\n  - name: a\n"
    (tmp_path / "e.yaml").write_text(text)
    with pytest.raises(ExperimentError) as info:
        experiments.load(tmp_path / "e.yaml")
    assert message in str(info.value)


def test_empty_variants_and_duplicate_keys(tmp_path, tiny_base):
    (tmp_path / "e.yaml").write_text(f"base_model: {tiny_base}\ndata: {{test: x}}\nvariants: []\n")
    with pytest.raises(ExperimentError, match="variants: must be a non-empty list"):
        experiments.load(tmp_path / "e.yaml", check_data=False)
    (tmp_path / "d.yaml").write_text("data: {test: x}\nvariants:\n  - name: a\nvariants:\n  - name: b\n")
    with pytest.raises(ExperimentError, match=r"d.yaml:4: variants: duplicate key 'variants' \(first at line 2\)"):
        experiments.load(tmp_path / "d.yaml", check_data=False)


def test_hostile_yaml_is_a_clear_error_quickly(tmp_path):
    import time

    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi")) + "variants: [*i]\n"
    cases = {"bomb.yaml": bomb.encode(), "deep.yaml": ("a: " + "[" * 5000 + "]" * 5000 + "\n").encode(),
             "binary.yaml": bytes(range(256)) * 4}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        t0 = time.perf_counter()
        with pytest.raises(ExperimentError, match=name):
            experiments.load(tmp_path / name, check_data=False)
        assert time.perf_counter() - t0 < 10, name


def test_python_tags_are_not_executed(tmp_path):
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['touch pwned']\nvariants: []\n")
    with pytest.raises(ExperimentError, match="not valid YAML"):
        experiments.load(tmp_path / "evil.yaml", check_data=False)
    assert not (tmp_path / "pwned").exists()
