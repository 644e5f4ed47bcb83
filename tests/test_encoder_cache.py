"""mla_registry.encoder_cache: outputs shared between variants within a memory budget; beyond it spilled to disk
or recomputed, with the same values; peak memory of an evaluation does not grow with the test set."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from mla_registry import testing
from mla_registry.encoder_cache import EncoderOutputs, encoder_fingerprint


@pytest.fixture(scope="module")
def model():
    return testing.tiny_whisper(d_model=64, frames=50, vocab=128)


def batches(n: int):
    return [(tuple(f"u{i}-{j}" for j in range(2)), torch.randn(2, 80, 100, generator=torch.Generator().manual_seed(i)))
            for i in range(n)]


@pytest.mark.parametrize("spill", [True, False])
def test_beyond_the_budget_outputs_are_spilled_or_recomputed_and_equal(model, tmp_path, spill):
    per_batch = 2 * 50 * 64 * 4
    cache = EncoderOutputs(budget_bytes=2 * per_batch, spill_dir=tmp_path / "spill",
                           beyond="disk" if spill else "recompute")
    fp = encoder_fingerprint(model)
    first = [cache.get(model, fp, ids, lambda f=f: f)[0].clone() for ids, f in batches(5)]
    assert cache.held_bytes == 2 * per_batch and cache.peak_bytes <= 2 * per_batch
    asked = []
    again = [cache.get(model, fp, ids, lambda f=f: asked.append(1) or f)[0] for ids, f in batches(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    report = cache.report()
    assert report["computed_batches"] == 5 and report["reused_batches"] == 2 + (3 if spill else 0)
    assert report["spilled_batches"] == (3 if spill else 0) and report["recomputed_batches"] == (0 if spill else 3)
    assert len(asked) == (0 if spill else 3)  # spilled batches need no features (no audio is decoded)
    cache.close()
    assert not (tmp_path / "spill").exists()


def test_the_cheaper_way_back_is_chosen_by_measured_time(model, tmp_path, monkeypatch):
    import mla_registry.encoder_cache as ec

    clock = iter([0.0, 5.0, 10.0, 10.1] * 10)  # encoder 5 s, writing 0.1 s: the disk is cheaper
    monkeypatch.setattr(ec.time, "perf_counter", lambda: next(clock))
    cache = EncoderOutputs(budget_bytes=0, spill_dir=tmp_path / "spill")
    ids, f = batches(1)[0]
    cache.get(model, "fp", ids, lambda: f)
    assert cache.spilled == 1
    clock = iter([0.0, 0.1, 10.0, 15.0] * 10)  # encoder 0.1 s, writing 5 s: recompute instead
    monkeypatch.setattr(ec.time, "perf_counter", lambda: next(clock))
    ids, f = batches(2)[1]
    cache.get(model, "fp", ids, lambda: f)
    assert cache.spilled == 1 and len(list((tmp_path / "spill").iterdir())) == 1


SCRIPT = r"""
import json, sys
from mla_registry import data, model_refs, testing
from mla_registry.evaluate import DecodeSettings, EncoderOutputs, evaluate, peak_rss_bytes
csv, budget = sys.argv[1], int(sys.argv[2])
processor = model_refs.load_processor("bundled:whisper-tiny.en")
model = testing.tiny_whisper(d_model=256, heads=4, layers=1)
utts = data.load(csv, lazy=True, quiet=True)
cache = EncoderOutputs(budget, spill_dir=sys.argv[3])
for _ in range(2):  # two "variants" sharing one encoder
    evaluate(model, processor, utts, DecodeSettings(batch_size=8, max_new_tokens=2), encoder_outputs=cache,
             quiet=True)
print(json.dumps({"peak_rss": peak_rss_bytes(), **cache.report()}))
"""


def test_peak_memory_stays_within_the_budget_however_large_the_test_set(tmp_path):
    """A synthetic test set whose encoder outputs (1500 x 256 x 4 bytes each) total ~0.3 GB: with a 16 MB budget
    the evaluation's peak memory stays where a 24-utterance set puts it; without a bound it grows by the outputs."""
    rng = np.random.default_rng(0)
    sets = {}
    for n in (24, 200):
        d = tmp_path / f"set{n}"
        d.mkdir()
        rows = ["file_name,transcription"]
        for i in range(n):
            sf.write(d / f"{i}.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
            rows.append(f"{i}.wav,some words")
        (d / "data.csv").write_text("\n".join(rows) + "\n")
        sets[n] = str(d / "data.csv")

    def run(n: int, budget: int) -> dict:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, sets[n], str(budget), str(tmp_path / f"spill{n}")],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    small, large, unbounded = run(24, 16 << 20), run(200, 16 << 20), run(200, 1 << 40)
    outputs = 200 * 1500 * 256 * 4  # ~307 MB of encoder outputs
    assert large["peak_memory_bytes"] <= 16 << 20 and large["spilled_batches"] + large["recomputed_batches"] > 0
    assert unbounded["peak_memory_bytes"] >= outputs
    assert large["peak_rss"] - small["peak_rss"] < 64 << 20, (small, large)  # does not grow with the set
    assert unbounded["peak_rss"] - large["peak_rss"] > outputs // 2, (large, unbounded)
    print(f"peak RSS: 24 utts {small['peak_rss'] >> 20} MiB; 200 utts budget 16 MiB {large['peak_rss'] >> 20} MiB; "
          f"200 utts unbounded {unbounded['peak_rss'] >> 20} MiB")


def test_tensor_store_keeps_what_fits_and_files_the_rest(tmp_path):
    from mla_registry.encoder_cache import TensorStore

    store = TensorStore(budget_bytes=2 * 400, directory=tmp_path / "s")
    tensors = {f"k{i}": torch.randn(10, 10) for i in range(5)}  # 400 bytes each
    for k, t in tensors.items():
        store.put(k, t)
    assert store.report()["in_memory"] == 2 and store.report()["on_disk"] == 3 and "k4" in store
    assert all(torch.equal(store.get(k), t) for k, t in tensors.items())
    store.close()
    assert not (tmp_path / "s").exists()
