"""Evaluate one model on one dataset: batched transcription, WER/CER, per-utterance records, timings and the
KV cache the model really held.

Encoder outputs can be shared between models whose encoders are identical
(:class:`~mla_registry.encoder_cache.EncoderOutputs`, keyed by a hash of the encoder's weights, not by trust, and
bounded in memory), so comparing N decoder variants costs one encoder pass. A test set opened lazily is read batch
by batch (each file when its batch is transcribed), so memory does not grow with the test set.
Utterances longer than Whisper's 30-second window are transcribed whole with transformers' long-form
(sequential, timestamped) decoding, never cut: the same path for every model compared. Greedy windows decode
through :mod:`mla_registry.decoding` (``decoder: loop``, the default: generate()'s tokens with less per-step
overhead) or through ``generate()`` (``decoder: generate``); beam search always uses ``generate()``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutput

from . import decoding, distributed, kvcache, normalize, scoring, whisper
from .atomic import write_json, write_text
from .config import between, setting
from .data import SAMPLE_RATE, Utterance
from .encoder_cache import EncoderOutputs, encoder_fingerprint
from .errors import DataError, KwargError
from .process_memory import peak_rss_bytes, reuse_heap_memory
from .surgery import describe

__all__ = ["DecodeSettings", "EncoderOutputs", "encoder_fingerprint", "evaluate", "peak_rss_bytes", "transcribe"]

WINDOW_SECONDS = 30.0  # Whisper's input window: longer audio goes through long-form decoding


@dataclass(frozen=True)
class DecodeSettings:
    """Decoding settings: identical for every model compared in one run (the YAML's ``decoding:``)."""

    batch_size: int = setting(16, "utterances decoded together", check=between(1, 4096))
    num_beams: int = setting(1, "beam width (1 = greedy)", check=between(1, 64), flags=("--beams", "--num-beams"))
    max_new_tokens: int = setting(128, "most tokens generated per 30-second window (Whisper's decoder holds 448 "
                                  "positions, prompt included)", check=between(1, 448))
    language: str | None = setting(None, "language of the audio, e.g. en (multilingual models; unset: detected "
                                   "per utterance; English-only models transcribe English)")
    task: str = setting("transcribe", "transcribe, or translate into English (multilingual models)",
                        choices=whisper.TASKS)
    decoder: str = setting("loop", "greedy windows through mla-registry's decoding loop (same tokens as generate, "
                           "less per-step overhead), or through transformers' generate; beam search and long-form "
                           "audio always use generate", choices=decoding.DECODERS)

    def __post_init__(self) -> None:
        from .config import check

        check(self)

    def generate_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """What ``generate()`` takes of these settings for ``model`` (language and task only when multilingual)."""
        out: dict[str, Any] = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens,
                               "do_sample": False}
        if whisper.is_multilingual(model):
            out["task"] = self.task
            if self.language is not None:
                out["language"] = self.language
        return out

    def uses_loop(self) -> bool:
        """Whether windows of <= 30 s decode through :func:`mla_registry.decoding.greedy` (greedy only)."""
        return self.decoder == "loop" and self.num_beams == 1

    def check_model(self, model: nn.Module) -> None:
        """Refuse settings the model cannot honour: a language or task it does not know, more positions than
        its decoder has."""
        whisper.check_language(model, self.language, self.task)
        limit = model.config.max_target_positions - len(whisper.prompt_ids(model, self.language, self.task))
        if self.max_new_tokens > limit:
            raise KwargError(f"decoding.max_new_tokens={self.max_new_tokens}: this model's decoder holds "
                             f"{model.config.max_target_positions} positions, {limit} after its prompt")


def check_output_dir(out: str | Path) -> None:
    """Refuse an output directory that holds anything but a previous evaluation's files: evaluation writes
    ``predictions.jsonl`` and ``metrics.json`` there and must not replace someone else's files of those names."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    if not out.is_dir():
        return
    ours = {"predictions.jsonl", "metrics.json"}
    present = {p.name for p in out.iterdir()}
    others = sorted(n for n in present - ours if not n.startswith("."))  # hidden: our temporaries
    if others:  # the help promises a new, empty or previous evaluation's directory: never a working directory
        raise DataError(f"--out {out}: holds files that are not an evaluation's ({', '.join(others[:5])}"
                        f"{', ...' if len(others) > 5 else ''}); choose a new or empty directory")
    try:
        previous = json.loads((out / "metrics.json").read_text(encoding="utf-8")) if "metrics.json" in present else {}
    except (OSError, ValueError):
        previous = None
    if present & ours and not (isinstance(previous, dict) and "normalizer" in previous):
        raise DataError(f"--out {out}: holds {', '.join(sorted(present & ours))} that mla-registry did not write; "
                        "choose another directory")


def speed(stats: dict[str, Any]) -> dict[str, float]:
    """Decode tokens per second and real-time factor (encoder + decode seconds over audio seconds)."""
    return {"decode_tokens_per_second": stats["generated_tokens"] / max(stats["decode_seconds"], 1e-9),
            "real_time_factor": (stats["encoder_seconds"] + stats["decode_seconds"]) / max(stats["audio_seconds"],
                                                                                           1e-9)}


def _count_tokens(sequences: torch.Tensor, eos: set[int]) -> int:
    """Tokens generated up to and including each row's first end-of-text."""
    return sum(next((j + 1 for j, t in enumerate(row) if t in eos), len(row)) for row in sequences.tolist())


def _eos(model: nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def _long_form(model: nn.Module, processor, utt: Utterance, settings: DecodeSettings) -> tuple[str, dict]:
    """One utterance longer than the window, through transformers' sequential long-form decoding."""
    param = next(model.parameters())
    inputs = processor.feature_extractor([utt.audio], sampling_rate=SAMPLE_RATE, return_tensors="pt",
                                         truncation=False, padding="longest", return_attention_mask=True)
    t0 = time.perf_counter()
    out = model.generate(inputs.input_features.to(param.device, param.dtype),
                         attention_mask=inputs.attention_mask.to(param.device), return_timestamps=True,
                         condition_on_prev_tokens=False, **settings.generate_kwargs(model))
    seconds = time.perf_counter() - t0
    text = processor.tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip()
    return text, {"decode_seconds": seconds, "generated_tokens": int(out.shape[-1])}


def _decode_window(model: nn.Module, hidden: torch.Tensor, settings: DecodeSettings,
                   step: decoding.DecoderStep | None) -> tuple[torch.Tensor, kvcache.KvBytes]:
    """Token sequences (prompt included) of one window's encoder output, and the KV cache held per sample:
    through the decoding loop when ``step`` is given (greedy), else through ``generate()``."""
    if step is not None:
        res = decoding.greedy(model, hidden, settings.max_new_tokens, settings.language, settings.task, step=step)
        return res.sequences, res.kv
    out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), return_dict_in_generate=True,
                         **settings.generate_kwargs(model))
    return out.sequences, kvcache.measure(getattr(out, "past_key_values", None))


@torch.no_grad()
def transcribe(model: nn.Module, processor, utts: list[Utterance], settings: DecodeSettings = DecodeSettings(),
               encoder_outputs: EncoderOutputs | None = None, quiet: bool = False,
               desc: str = "transcribing") -> tuple[list[str], dict[str, Any]]:
    """Greedy (or beam) transcripts of ``utts`` in order, and timings plus the measured KV cache.

    Batches are consecutive windows of ``batch_size`` utterances; each window's audio is read when the window
    is transcribed (and only when its encoder output is not cached), and its utterances longer than the
    30-second window go through long-form decoding. Under ``torchrun`` each rank decodes whole windows (window
    k on rank k mod world size, the same members as in a single process) and every rank returns the gathered,
    ordered transcripts.
    """
    settings.check_model(model)
    threads = decoding.configure_threads()
    reuse_heap_memory()  # freed buffers reused, not mapped afresh; peak memory flat (see process_memory)
    param = next(model.parameters())
    fp = encoder_fingerprint(model) if encoder_outputs is not None else ""
    windows = [list(range(i, min(i + settings.batch_size, len(utts)))) for i in range(0, len(utts),
                                                                                      settings.batch_size)]
    local = getattr(utts, "sharded", False)  # a streamed shard: this rank's data already, decode all of it
    mine = list(range(len(windows))) if local else distributed.my_share(len(windows))
    done: dict[int, str] = {}
    stats = {"encoder_seconds": 0.0, "decode_seconds": 0.0, "generated_tokens": 0, "long_form_utterances": 0,
             "audio_seconds": 0.0}
    kv, kv_utts = kvcache.KvBytes(), 0
    prompt = len(whisper.prompt_ids(model, settings.language, settings.task))
    eos = _eos(model)
    step = decoding.DecoderStep(model) if settings.uses_loop() else None
    bar = tqdm(total=sum(len(windows[k]) for k in mine), desc=desc, disable=quiet, unit="utt")
    for k in mine:
        batch = [utts[i] for i in windows[k]]
        audio = {u.id: u.audio for u in batch if not u.duration_known}  # durations decide the path
        short = [(i, u) for i, u in zip(windows[k], batch) if fits_window(u)]
        stats["audio_seconds"] += sum(u.duration for u in batch)

        def features(short=short, audio=audio) -> torch.Tensor:
            return whisper.input_features(processor, [audio.get(u.id) if u.id in audio else u.audio
                                                      for _, u in short])

        if short:
            ids = tuple(u.id for _, u in short)
            if encoder_outputs is not None:
                hidden, seconds = encoder_outputs.get(model, fp, ids, features)
            else:
                feats = features().to(param.device, param.dtype)
                t0 = time.perf_counter()
                hidden = whisper.encode(model, feats)
                seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            sequences, held = _decode_window(model, hidden, settings, step)
            stats["decode_seconds"] += time.perf_counter() - t1
            stats["encoder_seconds"] += seconds
            stats["generated_tokens"] += _count_tokens(sequences[:, prompt:], eos)
            kv, kv_utts = kv + kvcache.KvBytes(*(x * len(short) for x in held.astuple())), kv_utts + len(short)
            texts = processor.tokenizer.batch_decode(sequences, skip_special_tokens=True)
            done.update({i: t.strip() for (i, _), t in zip(short, texts)})
        for i, u in zip(windows[k], batch):
            if not fits_window(u):
                done[i], extra = _long_form(model, processor, u, settings)
                stats["decode_seconds"] += extra["decode_seconds"]
                stats["generated_tokens"] += extra["generated_tokens"]
                stats["long_form_utterances"] += 1
        audio.clear()
        bar.update(len(batch))
        bar.set_postfix(audio_h=f"{stats['audio_seconds'] / 3600:.2f}")
    bar.close()

    parts = distributed.gather((done, stats, kv, kv_utts)) if not local else [(done, stats, kv, kv_utts)]
    merged = {i: h for part in parts for i, h in part[0].items()}
    hyps = [merged[i] for i in range(len(utts))]
    total = {key: sum(p[1][key] for p in parts) for key in stats}
    if len(parts) > 1:  # ranks ran in parallel: wall time is the slowest rank's
        total["encoder_seconds"] = max(p[1]["encoder_seconds"] for p in parts)
        total["decode_seconds"] = max(p[1]["decode_seconds"] for p in parts)
        total["world_size"] = len(parts)
    kv_all = sum((p[2] for p in parts), kvcache.KvBytes())
    n = max(sum(p[3] for p in parts), 1)
    total.update(kv_self_bytes_per_token=kv_all.self_per_token / n,
                 kv_self_bytes_per_utterance=kv_all.self_per_utterance / n,
                 kv_cross_bytes_per_utterance=kv_all.cross_per_utterance / n)
    total.update(speed(total))
    total["peak_rss_bytes"] = peak_rss_bytes()
    total["torch_threads"] = threads
    return hyps, total


def fits_window(u: Utterance) -> bool:
    """Whether ``u`` fits Whisper's window (decoded in batches; longer ones go through long-form decoding)."""
    return u.duration <= WINDOW_SECONDS


def records_for(utts: list[Utterance], hyps: list[str], language: str | None = None) -> list[dict[str, Any]]:
    """Per-utterance records: id, voice, source, reference, hypothesis, normalised forms and edit counts (with
    the normaliser for ``language``)."""
    normalise, _ = normalize.for_language(language)
    out = []
    for u, h in zip(utts, hyps):
        out.append({"id": u.id, "voice": u.voice, "source": u.source, "reference": u.text, "hypothesis": h,
                    "seconds": round(u.duration, 3), **scoring.score_utterance(u.text, h, normalise)})
    return out


def summarise(records: list[dict[str, Any]], language: str | None = None) -> dict[str, Any]:
    """Totals plus per-voice and per-source breakdowns, and the normaliser they went through."""
    return {**scoring.totals(records), "by_voice": scoring.by_group(records, "voice"),
            "by_source": scoring.by_group(records, "source"), "normalizer": normalize.for_language(language)[1]}


def _transcribe_with(model, processor, utts, settings, encoder_outputs, quiet) -> tuple[list[str], dict[str, Any]]:
    """A PyTorch model through :func:`transcribe`; an exported model's runtime (an
    :class:`~mla_registry.export.backends.ExportedBackend`: ONNX Runtime, CTranslate2) through its own loop."""
    if isinstance(model, nn.Module):
        return transcribe(model, processor, utts, settings, encoder_outputs, quiet)
    return model.transcribe(processor, utts, settings, quiet=quiet)


def _model_facts(model) -> dict[str, Any]:
    if isinstance(model, nn.Module):
        return {"parameters": sum(p.numel() for p in model.parameters()), "attention": describe(model)}
    return {"backend": model.describe()}


def evaluate(model: nn.Module, processor, utts: list[Utterance], settings: DecodeSettings = DecodeSettings(),
             out_dir: str | Path | None = None, encoder_outputs: EncoderOutputs | None = None,
             quiet: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Transcribe, score, and (with ``out_dir``) write ``predictions.jsonl`` and ``metrics.json`` atomically.
    An empty test set is an error: a WER over nothing is not a number."""
    if not utts and not getattr(utts, "sharded", False):
        raise DataError("the test set has no utterances: there is nothing to evaluate")
    hyps, stats = _transcribe_with(model, processor, utts, settings, encoder_outputs, quiet)
    records = records_for(utts, hyps, settings.language)
    if getattr(utts, "sharded", False):  # streamed shards: gather the records and timings of every rank
        parts = distributed.gather((records, stats))
        records = [r for part in parts for r in part[0]]
        stats = {**stats, "world_size": len(parts), **{k: sum(p[1][k] for p in parts) for k in (
            "generated_tokens", "audio_seconds", "long_form_utterances")}, **{k: max(p[1][k] for p in parts) for k in (
            "encoder_seconds", "decode_seconds")}}
        stats.update(speed(stats))
        if not records:
            raise DataError("the test set has no utterances on any rank: there is nothing to evaluate")
    metrics = {
        **summarise(records, settings.language),
        "decoding": asdict(settings),
        **_model_facts(model),
        **stats,
        **(extra or {}),
    }
    if out_dir is not None and distributed.world().is_main:
        out_dir = Path(out_dir)
        write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        write_json(out_dir / "metrics.json", metrics)
    return metrics
