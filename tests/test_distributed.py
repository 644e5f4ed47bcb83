"""Evaluation under torchrun (2 CPU processes, gloo): each utterance decoded once, records gathered, files
written once by rank 0, and results identical to a single process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

DATA = "builtin:real?source=librispeech_test_clean"
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun test written for Linux")


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _torchrun(*args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _evaluate(out, *launcher):
    args = ["-m", "mla_registry.cli.main", "evaluate", "--model", "bundled:whisper-tiny.en", "--data", DATA,
            "--batch-size", "1", "--max-new-tokens", "60", "--quiet", "--out", str(out)]
    if launcher:
        return _torchrun(*args)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=_env())


def test_two_processes_match_one(tmp_path):
    single = _evaluate(tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    double = _evaluate(tmp_path / "double", "torchrun")
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("WER %") == 1  # only rank 0 reports
    a = (tmp_path / "single" / "predictions.jsonl").read_text().splitlines()
    b = (tmp_path / "double" / "predictions.jsonl").read_text().splitlines()
    assert len(a) == 4 and a == b
    ma = json.loads((tmp_path / "single" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "double" / "metrics.json").read_text())
    assert ma["wer"] == mb["wer"] and ma["errors"] == mb["errors"]
    assert mb["world_size"] == 2 and ma["generated_tokens"] == mb["generated_tokens"]


def test_a_failing_rank_stops_the_others_with_its_message(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        from mla_registry import distributed
        world, _ = distributed.setup("cpu")
        if world.rank == 1:
            raise RuntimeError("rank one cannot read its shard")
        distributed.gather("waiting for rank 1")  # rank 0 would wait forever without the launcher
    """))
    proc = _torchrun(str(script), timeout=180)
    assert proc.returncode != 0
    assert "rank one cannot read its shard" in proc.stdout + proc.stderr


def _hub_layout(root, shards=2):
    """The 4 real LibriSpeech test-clean clips as a hub-layout dataset (parquet shards with embedded audio)."""
    from datasets import Audio, Dataset
    from datasets.table import embed_table_storage

    from mla_registry.data import load

    utts = load(DATA, quiet=True)
    folder = os.path.join(os.path.dirname(__file__), "..", "mla_registry", "resources", "real_speech",
                          "librispeech_test_clean")
    (root / "data").mkdir(parents=True)
    for k in range(shards):
        part = utts[k::shards]
        ds = Dataset.from_dict({
            "id": [u.id for u in part], "text": [u.text for u in part],
            "audio": [os.path.join(folder, u.id.split("/")[-1] + ".flac") for u in part],
        }).cast_column("audio", Audio())
        ds = ds.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
        ds.to_parquet(str(root / "data" / f"test-{k:05d}-of-{shards:05d}.parquet"))
    return root


def test_streamed_hub_dataset_is_sharded_by_node(tmp_path):
    hub = _hub_layout(tmp_path / "hub")
    args = ["-m", "mla_registry.cli.main", "evaluate", "--model", "bundled:whisper-tiny.en", "--batch-size", "1",
            "--max-new-tokens", "60", "--quiet"]
    single = subprocess.run([sys.executable, *args, "--data", f"hf:{hub}?split=test", "--out",
                             str(tmp_path / "single")], capture_output=True, text=True, timeout=600, env=_env())
    assert single.returncode == 0, single.stderr[-3000:]
    double = _torchrun(*args, "--data", f"hf:{hub}?split=test&streaming=true", "--out", str(tmp_path / "double"))
    assert double.returncode == 0, double.stderr[-3000:]

    def records(name):
        rows = [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        return sorted(rows, key=lambda r: r["id"])
    a, b = records("single"), records("double")
    assert len(a) == 4 and [r["hypothesis"] for r in a] == [r["hypothesis"] for r in b]
    assert [r["id"] for r in a] == [r["id"] for r in b]
    ma = json.loads((tmp_path / "single" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "double" / "metrics.json").read_text())
    assert ma["wer"] == mb["wer"] and mb["world_size"] == 2


def test_two_process_finetuning_writes_one_checkpoint_that_reloads(tmp_path, tiny_model):
    """Data-parallel fine-tuning: both ranks train their half of each batch, gradients are summed, rank 0 alone
    writes; the result matches a single-process run on the same batches."""
    import torch

    from mla_registry import checkpoint, lineage, model_refs
    from mla_registry.convert import convert_model

    processor = model_refs.load_processor("bundled:whisper-tiny.en")
    teacher, src = tmp_path / "teacher", tmp_path / "mla16"
    model = tiny_model()
    checkpoint.save(model, teacher, processor)
    convert_model(model, processor, ["decoder.*=mla:rank=16,init=svd"])
    lineage.of(model).provenance.source_model = str(teacher)
    checkpoint.save(model, src, processor)
    args = ["-m", "mla_registry.cli.main", "finetune", "--model", str(src), "--train", DATA, "--valid", DATA,
            "--objective", "ce+distill", "--steps", "3", "--batch-size", "4", "--eval-every", "1", "--lr", "1e-3",
            "--warmup-steps", "0", "--patience", "0", "--quiet"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=600, env=_env())
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(*args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone reports and writes
    assert not (tmp_path / "two.work" / "state" / "params.safetensors.tmp").exists()

    a, b = checkpoint.load(tmp_path / "one"), checkpoint.load(tmp_path / "two")
    assert checkpoint.read_manifest(tmp_path / "two")["provenance"]["finetunes"][-1]["world_size"] == 2
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    changed = [n for n in pa if "kv_down" in n or "k_up" in n]
    assert changed and all(torch.allclose(pa[n], pb[n], atol=1e-5) for n in pa)
    feats = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a.generate(feats, max_new_tokens=5), b.generate(feats, max_new_tokens=5))
