"""Evaluate one model on one dataset: batched transcription, WER/CER, per-utterance records, timings and the
KV cache the model really held.

Encoder outputs can be shared between models whose encoders are identical (:class:`EncoderOutputs`, keyed by a
hash of the encoder's weights, not by trust), so comparing N decoder variants costs one encoder pass.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutput

from . import distributed, normalize, scoring
from .cache import write_json_atomic, write_text_atomic
from .data import Utterance
from .families import whisper
from .surgery import describe

SAMPLING_RATE = whisper.SAMPLING_RATE


@dataclass(frozen=True)
class DecodeSettings:
    """Decoding settings: identical for every model compared in one run."""

    batch_size: int = 16
    num_beams: int = 1
    max_new_tokens: int = 128


def encoder_fingerprint(model: nn.Module) -> str:
    """sha256 over the encoder's parameter names, dtypes, shapes and bytes: equal only for identical encoders."""
    return state_fingerprint(model.get_encoder())


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's state-dict names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class EncoderOutputs:
    """Encoder outputs per (encoder fingerprint, batch of utterance ids), computed once and reused."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, tuple[str, ...]], tuple[torch.Tensor, float]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, model: nn.Module, fingerprint: str, ids: tuple[str, ...],
            feats: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The encoder output for this batch, and the seconds it took when it was computed (so speed figures
        stay comparable between the variant that computed it and those that reuse it)."""
        key = (fingerprint, ids)
        if key in self._store:
            self.hits += 1
            return self._store[key]
        self.misses += 1
        t0 = time.perf_counter()
        out = model.get_encoder()(feats).last_hidden_state
        self._store[key] = (out, time.perf_counter() - t0)
        return self._store[key]


def measure_cache(past_key_values) -> dict[str, float]:
    """Bytes the cache really holds after generation, per sample: self-attention per token, cross per utterance."""
    out = {"kv_self_bytes_per_token": 0.0, "kv_cross_bytes_per_utterance": 0.0}
    if past_key_values is None:
        return out
    for attr, key in (("self_attention_cache", "self"), ("cross_attention_cache", "cross")):
        cache = getattr(past_key_values, attr, None)
        for layer in getattr(cache, "layers", []):
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if k is None or not torch.is_tensor(k) or k.dim() < 3:
                continue
            batch, length = k.shape[0], k.shape[-2]
            nbytes = k.numel() * k.element_size() + (v.numel() * v.element_size() if v is not None else 0)
            if key == "self":
                out["kv_self_bytes_per_token"] += nbytes / (batch * max(length, 1))
            else:
                out["kv_cross_bytes_per_utterance"] += nbytes / batch
    return out


@torch.no_grad()
def transcribe(model: nn.Module, processor, utts: list[Utterance], settings: DecodeSettings = DecodeSettings(),
               encoder_outputs: EncoderOutputs | None = None, quiet: bool = False,
               desc: str = "transcribing") -> tuple[list[str], dict[str, Any]]:
    """Greedy (or beam) transcripts of ``utts`` in order, and timings plus the measured KV cache.

    Under ``torchrun`` each rank decodes whole batches (batch k on rank k mod world size, so every batch has the
    same members as in a single process) and every rank returns the gathered, ordered transcripts.
    """
    param = next(model.parameters())
    fingerprint = encoder_fingerprint(model) if encoder_outputs is not None else ""
    batches = [utts[i: i + settings.batch_size] for i in range(0, len(utts), settings.batch_size)]
    local = getattr(utts, "sharded", False)  # a streamed shard: this rank's data already, decode all of it
    mine = list(range(len(batches))) if local else distributed.my_share(len(batches))
    done: dict[int, list[str]] = {}
    stats = {"encoder_seconds": 0.0, "decode_seconds": 0.0, "generated_tokens": 0}
    kv: dict[str, float] | None = None
    prompt = len(whisper.prompt_ids(model))
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    bar = tqdm(total=sum(len(batches[k]) for k in mine), desc=desc, disable=quiet, unit="utt")
    for k in mine:
        batch = batches[k]
        feats = whisper.input_features(processor, [u.audio for u in batch], param.device, param.dtype)
        if encoder_outputs is not None:
            hidden, seconds = encoder_outputs.get(model, fingerprint, tuple(u.id for u in batch), feats)
        else:
            t0 = time.perf_counter()
            hidden = model.get_encoder()(feats).last_hidden_state
            seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens, do_sample=False,
            return_dict_in_generate=True,
        )
        stats["decode_seconds"] += time.perf_counter() - t1
        stats["encoder_seconds"] += seconds
        for row in out.sequences[:, prompt:].tolist():
            stats["generated_tokens"] += next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        if kv is None:
            kv = measure_cache(getattr(out, "past_key_values", None))
        done[k] = [t.strip() for t in processor.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
        bar.update(len(batch))
    bar.close()

    parts = distributed.gather((done, stats, kv)) if not local else [(done, stats, kv)]
    hyps = [h for k in range(len(batches)) for part in parts if k in part[0] for h in part[0][k]]
    total = {key: sum(p[1][key] for p in parts) for key in stats}
    if len(parts) > 1:  # ranks ran in parallel: wall time is the slowest rank's
        total["encoder_seconds"] = max(p[1]["encoder_seconds"] for p in parts)
        total["decode_seconds"] = max(p[1]["decode_seconds"] for p in parts)
        total["world_size"] = len(parts)
    total["audio_seconds"] = sum(len(u.audio) for u in utts) / SAMPLING_RATE
    total.update(next((p[2] for p in parts if p[2] is not None), None) or measure_cache(None))
    total["decode_tokens_per_second"] = total["generated_tokens"] / max(total["decode_seconds"], 1e-9)
    total["real_time_factor"] = (total["encoder_seconds"] + total["decode_seconds"]) / max(
        total["audio_seconds"], 1e-9)
    return hyps, total


def records_for(utts: list[Utterance], hyps: list[str]) -> list[dict[str, Any]]:
    """Per-utterance records: id, voice, source, reference, hypothesis, normalised forms and edit counts."""
    out = []
    for u, h in zip(utts, hyps):
        out.append({"id": u.id, "voice": u.voice, "source": u.source, "reference": u.text, "hypothesis": h,
                    **scoring.score_utterance(u.text, h)})
    return out


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals plus per-voice and per-source breakdowns."""
    return {**scoring.totals(records), "by_voice": scoring.by_group(records, "voice"),
            "by_source": scoring.by_group(records, "source"), "normalizer": normalize.name()}


def evaluate(model: nn.Module, processor, utts: list[Utterance], settings: DecodeSettings = DecodeSettings(),
             out_dir: str | Path | None = None, encoder_outputs: EncoderOutputs | None = None,
             quiet: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Transcribe, score, and (with ``out_dir``) write ``predictions.jsonl`` and ``metrics.json`` atomically."""
    hyps, stats = transcribe(model, processor, utts, settings, encoder_outputs, quiet)
    records = records_for(utts, hyps)
    if getattr(utts, "sharded", False):  # streamed shards: gather the records and timings of every rank
        parts = distributed.gather((records, stats))
        records = [r for part in parts for r in part[0]]
        stats = {**stats, "world_size": len(parts), **{k: sum(p[1][k] for p in parts) for k in (
            "generated_tokens", "audio_seconds")}, **{k: max(p[1][k] for p in parts) for k in (
            "encoder_seconds", "decode_seconds")}}
        stats["decode_tokens_per_second"] = stats["generated_tokens"] / max(stats["decode_seconds"], 1e-9)
        stats["real_time_factor"] = (stats["encoder_seconds"] + stats["decode_seconds"]) / max(
            stats["audio_seconds"], 1e-9)
    metrics = {
        **summarise(records),
        "decoding": asdict(settings),
        "parameters": sum(p.numel() for p in model.parameters()),
        "attention": describe(model),
        **stats,
        **(extra or {}),
    }
    if out_dir is not None and distributed.world().is_main:
        out_dir = Path(out_dir)
        write_text_atomic(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics
