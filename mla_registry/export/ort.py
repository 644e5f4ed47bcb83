"""Greedy decoding of an ONNX export with ONNX Runtime: what ``mla-registry evaluate --backend onnxruntime``
runs. The loop mirrors ``generate()``'s greedy search for Whisper: the prompt, then the argmax of each step's
logits after the generation config's suppressions (``suppress_tokens`` always, ``begin_suppress_tokens`` on
the first generated token), finished rows padded with end-of-text, until every row ended or
``max_new_tokens``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError, InstallError
from .onnx import GRAPHS, read_graphs


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise InstallError("--backend onnxruntime needs onnxruntime: pip install 'mla-registry[onnx]'") from None
    return onnxruntime


@dataclass
class CacheHeld:
    """Bytes per sample of the cache tensors the loop really passed (read from the arrays, not declared)."""

    self_per_token: float = 0.0
    self_tokens: int = 0  # positions in the self-attention cache at the end (prompt included)
    cross_per_frame: float = 0.0
    cross_per_utterance: float = 0.0
    shapes: dict[str, list[int]] = field(default_factory=dict)


class OrtWhisper:
    """The three graphs of an ONNX export in ONNX Runtime sessions (CUDA provider when installed and asked)."""

    def __init__(self, export_dir: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        ort = _ort()
        export_dir = Path(export_dir)
        if not (export_dir / GRAPHS).is_file():
            raise ExportError(f"{export_dir}: not an ONNX export of mla-registry (no {GRAPHS}); write one with "
                              "mla-registry export CKPT --to onnx --out DIR")
        self.dir = export_dir
        self.info = read_graphs(export_dir)
        self.layout = self.info["layout"]
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {name: ort.InferenceSession(str(export_dir / f"{name}.onnx"), opts, providers=providers)
                         for name in ("encoder", "cross_cache", "decoder")}
        self.providers = self.sessions["decoder"].get_providers()
        self.last_cache = CacheHeld()

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Encoder output for ``features [B, mels, frames]``; on the CPU provider in slices of
        :data:`mla_registry.whisper.CPU_ENCODER_SLICE` rows, as the PyTorch encoder runs (each row is encoded on
        its own either way). Measured on 16 real clips (tiny.en, 2 cores): the whole batch raised the peak RSS by
        1.6 GB (ONNX Runtime's arena keeps every row's 1500 x 1500 attention scores; five exports side by side in
        bench/decode.py ran a 24 GiB machine out of memory) and took 1.8x the time of slices of 2 (+0.15 GB),
        with bit-identical outputs."""
        from ..whisper import CPU_ENCODER_SLICE

        x = features.astype(np.float32)
        step = CPU_ENCODER_SLICE if self.providers[0] == "CPUExecutionProvider" else max(1, len(x))
        return np.concatenate([self.sessions["encoder"].run(None, {"input_features": x[i:i + step]})[0]
                               for i in range(0, len(x), step)])

    def generate(self, encoder_hidden_states: np.ndarray, max_new_tokens: int, min_new_tokens: int = 0,
                 clock: Callable[[], None] | None = None) -> list[list[int]]:
        """Greedy token ids per row: the prompt, the generated tokens, and end-of-text where a row ended (not
        before ``min_new_tokens``: the benchmark's forced length). ``clock``, when given, is called after every
        step whose logits choose a token (the benchmark's step timer)."""
        info, lay = self.info, self.layout
        batch = encoder_hidden_states.shape[0]
        cross_names = lay.names("cross")
        cross = dict(zip(cross_names, self.sessions["cross_cache"].run(None, {
            "encoder_hidden_states": encoder_hidden_states})))
        self_names = lay.names("self")
        past = {n: np.zeros((batch, e.heads, 0, e.width), np.float32)
                for n, e in zip(self_names, lay.entries("self"))}
        prompt, eos = info["prompt"], info["eos_token_id"]
        suppress = np.asarray(info["suppress_tokens"], dtype=np.int64)
        begin = np.asarray(info["begin_suppress_tokens"], dtype=np.int64)
        rows = [list(prompt) for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        limit = min(max_new_tokens, info["max_target_positions"] - len(prompt))
        for pos in range(len(prompt) + limit - 1):
            token = np.array([[r[pos]] for r in rows], dtype=np.int64)
            outs = self.sessions["decoder"].run(None, {"input_ids": token, "position": np.array([pos], np.int64),
                                                       **{f"past.{n}": past[n] for n in self_names}, **cross})
            past = dict(zip(self_names, outs[1:]))
            if pos + 1 < len(prompt):
                continue  # still feeding the prompt
            logits = outs[0]
            if len(suppress):
                logits[:, suppress] = -np.inf
            if pos + 1 == len(prompt) and len(begin):
                logits[:, begin] = -np.inf
            if pos + 1 - len(prompt) < min_new_tokens:
                logits[:, eos] = -np.inf
            nxt = logits.argmax(axis=-1)
            if clock is not None:
                clock()
            for i in range(batch):
                rows[i].append(eos[0] if done[i] else int(nxt[i]))
                done[i] |= rows[i][-1] in eos
            if done.all():
                break
        tokens = next(iter(past.values())).shape[2] if past else 0
        self.last_cache = CacheHeld(
            self_per_token=sum(a[0].nbytes for a in past.values()) / max(tokens, 1), self_tokens=tokens,
            cross_per_frame=sum(a[0].nbytes / a.shape[2] for a in cross.values()),
            cross_per_utterance=sum(a[0].nbytes for a in cross.values()),
            shapes={**{n: list(a.shape) for n, a in past.items()}, **{n: list(a.shape) for n, a in cross.items()}})
        return rows

    def describe(self) -> dict[str, Any]:
        """What evaluation records about this backend."""
        return {"backend": "onnxruntime", "providers": self.providers, "export": str(self.dir),
                "graph_bytes": self.info["graph_bytes"], "declared_bytes": self.info["declared_bytes"]}
