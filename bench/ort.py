"""The ONNX Runtime rows of the decoding benchmark: every variant exported with ``mla-registry export --to onnx``'s
own writer (encoder, cross-cache and decoder-step graphs that pass the plugin's cache: the MLA latent, GQA's
pooled heads) and decoded greedily by :class:`mla_registry.export.ort.OrtWhisper`, the loop that
``mla-registry evaluate --backend onnxruntime`` runs. Same encoder output (step rows) or the export's own encoder
(end-to-end rows), same clips, batch sizes and thread count as the PyTorch rows (optional dependency
``onnxruntime``, extra ``[onnx]``; rows skipped with a note when it is absent)."""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mla_registry.export.backends import generated_ids

NAME = "onnxruntime"


def available(args, notes: list[str]) -> bool:
    """Whether ONNX Runtime rows can run here (a note says why not)."""
    if args.no_ort:
        return False
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        notes.append("ONNX Runtime rows skipped: onnx/onnxruntime are not installed (pip install 'mla-registry[onnx]')")
        return False
    if args.dtype != "float32":
        notes.append(f"ONNX Runtime rows skipped: the export is float32, the benchmark runs {args.dtype}")
        return False
    return True


class Exports:
    """The ONNX exports of the benchmarked variants, in a temporary directory that lives as long as the run."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-onnx-")
        self.runtimes: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}

    def add(self, name: str, model: torch.nn.Module, processor, device: str) -> Any:
        from mla_registry.export.onnx import write_onnx
        from mla_registry.export.ort import OrtWhisper

        out = Path(self._tmp.name) / name
        out.mkdir()
        t0 = time.perf_counter()
        write_onnx(model, processor, out)
        self.seconds[name] = time.perf_counter() - t0
        self.runtimes[name] = OrtWhisper(out, device=device, threads=torch.get_num_threads())
        return self.runtimes[name]

    def close(self) -> None:
        self.runtimes.clear()
        self._tmp.cleanup()


def note(exports: Exports) -> str:
    import onnxruntime

    providers = sorted({p for r in exports.runtimes.values() for p in r.providers})
    return (f"ONNX Runtime {onnxruntime.__version__} ({', '.join(providers)}): each variant exported by "
            "mla_registry.export.onnx.write_onnx (opset 17, float32, its own cache tensors) and decoded by "
            "OrtWhisper's greedy loop (finished rows kept, padded); step rows decode the PyTorch encoder's output, "
            "end-to-end rows run the export's encoder.onnx; export took "
            + ", ".join(f"{n} {s:.0f} s" for n, s in exports.seconds.items()))


def run_decode(runtime, hidden: torch.Tensor, steps: int, forced: bool) -> dict[str, Any]:
    """What ``measure.run_decode`` returns, for one greedy decode of ``hidden`` through ONNX Runtime (the cross
    cache graph and the prompt steps count as the prefill)."""
    stamps: list[float] = []
    feats = hidden.float().cpu().numpy()
    t0 = time.perf_counter()
    rows = runtime.generate(feats, steps, min_new_tokens=steps if forced else 0,
                            clock=lambda: stamps.append(time.perf_counter()))
    t1 = time.perf_counter()
    prompt = len(runtime.info["prompt"])
    eos = set(runtime.info["eos_token_id"])
    width = max(len(r) for r in rows) - prompt
    seqs = torch.tensor([r[prompt:] + [min(eos)] * (width - len(r) + prompt) for r in rows])
    intervals = [b - a for a, b in itertools.pairwise([t0, *stamps])]
    held, batch = runtime.last_cache, len(rows)
    length = held.self_tokens
    return {"seconds": t1 - t0, "tokens": sum(generated_ids(r, prompt, eos)[1] for r in rows), "steps": width,
            "prefill": intervals[0] if intervals else None, "step_times": intervals[1:],
            "kv_self": int(held.self_per_token * batch * length), "kv_cross": int(held.cross_per_utterance * batch),
            "self_length": length, "peak_bytes": None, "sequences": seqs}


def end_to_end(runtime, windows: list[torch.Tensor], max_new_tokens: int) -> dict[str, Any]:
    """The export's encoder + greedy decode (natural lengths) of every window of features; seconds of each part,
    the generated ids per utterance (prompt and end-of-text left out, as CTranslate2 returns them) and the count
    of generated tokens (end-of-text included, as ``measure.count_tokens`` counts)."""
    enc = dec = 0.0
    prompt = len(runtime.info["prompt"])
    eos = set(runtime.info["eos_token_id"])
    tokens: list[list[int]] = []
    counted = 0
    for feats in windows:
        t0 = time.perf_counter()
        hidden = runtime.encode(np.ascontiguousarray(feats.float().cpu().numpy()))
        t1 = time.perf_counter()
        rows = runtime.generate(hidden, max_new_tokens)
        t2 = time.perf_counter()
        enc, dec = enc + t1 - t0, dec + t2 - t1
        for row in rows:
            ids, n = generated_ids(row, prompt, eos)
            tokens.append(ids)
            counted += n
    return {"encoder_s": enc, "decode_s": dec, "tokens": tokens, "counted": counted}
