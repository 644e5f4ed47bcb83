"""A lean greedy decoding loop for Whisper-family models: the tokens of ``generate(num_beams=1)``, without its
per-step overhead.

``generate()`` spends, per step, as much time around the decoder as in it on a CPU (logits processors, cache
bookkeeping by concatenation, stopping criteria, logits for every position in the prefill). This loop keeps
only what greedy Whisper decoding needs:

- the encoder output comes in (shared between models as in :mod:`mla_registry.evaluate`); the
  cross-attention cache is filled once, by the attention modules themselves on the first step;
- the self-attention cache is allocated once for the prompt plus ``max_new_tokens``
  (:mod:`mla_registry.decode_cache`), so no step concatenates or reallocates;
- logits are computed for the last position only;
- the prompt (``<|startoftranscript|>``, language and task for multilingual models, ``<|notimestamps|>``) is
  forced, and Whisper's suppressed tokens (and the tokens suppressed on the first step) are one precomputed
  additive mask each, as ``generate()``'s ``SuppressTokens*LogitsProcessor`` apply them;
- finished rows are dropped from the batch (cache, encoder output and all) once they are a quarter of it, so a
  long straggler decodes alone.

The decoder is called through its ordinary forward with the host's cache argument, so stock ``WhisperAttention``
and every plugin module run unchanged through the same ``EncoderDecoderCache`` protocol.
Multilingual models without a language detect it per utterance exactly as ``generate()`` does (one cache-less
decoder call on ``<|startoftranscript|>``, argmax over the language tokens).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import kvcache, whisper
from .attention import host_cache_kwarg
from .decode_cache import decoding_cache, select_rows

DECODERS = ("loop", "generate")
# Finished rows leave the batch once they are this share of it. Each drop copies the kept rows' caches
# (``index_select``); until then the finished rows run along and their tokens are discarded. Interleaved A/B on
# 96 tts-test clips, batch 16, 2 cores (median of 4; identical tokens): dropping at the first finished row
# against at a quarter: stock 6.56 -> 5.86 s, mha 6.03 -> 5.81, MLA-192 8.91 -> 8.85, GQA-2 1.08 -> 1.12; at a
# half MLA-192 was slower (9.34).
COMPACT_AT = 0.25


def configure_threads() -> int:
    """Set torch's intra-op threads from the machine (the CPUs this process may run on) unless the user chose a
    count through ``OMP_NUM_THREADS``; returns the count in use (recorded in metrics)."""
    if not os.environ.get("OMP_NUM_THREADS"):
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            usable = os.cpu_count() or 1
        if torch.get_num_threads() != usable:
            torch.set_num_threads(usable)
    return torch.get_num_threads()


@dataclass
class GreedyResult:
    """The generated tokens (prompt included, end-of-text padded as ``generate()`` pads), and what it cost."""

    sequences: torch.Tensor
    prompt_length: int
    steps: int = 0  # decoder calls after the prefill
    kv: kvcache.KvBytes = field(default_factory=kvcache.KvBytes)  # per sample, as kvcache.measure reports
    step_seconds: list[float] = field(default_factory=list)  # per decoder call: the prefill first, then each step


class Suppression:
    """Whisper's suppressed tokens as additive ``-inf`` masks over the vocabulary: ``always`` on every step,
    ``first`` (``begin_suppress_tokens``: a blank and end-of-text) on the first generated token too."""

    def __init__(self, model: nn.Module, vocab: int, device: torch.device, dtype: torch.dtype) -> None:
        gen = model.generation_config
        self.always = self._mask(gen.suppress_tokens, vocab, device, dtype)
        self.first = self._mask(list(gen.suppress_tokens or []) + list(gen.begin_suppress_tokens or []), vocab,
                                device, dtype)

    @staticmethod
    def _mask(tokens, vocab: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        mask = torch.zeros(vocab, device=device, dtype=dtype)
        ids = [t for t in (tokens or []) if 0 <= t < vocab]
        if ids:
            mask[ids] = float("-inf")
        return mask


def _eos(model: nn.Module) -> list[int]:
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def detect_language(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Language token per row, as ``generate()`` detects it: one cache-less decoder call on
    ``<|startoftranscript|>``, logits restricted to the language tokens, argmax."""
    gen = model.generation_config
    start = torch.full((hidden.shape[0], 1), gen.decoder_start_token_id, dtype=torch.long, device=hidden.device)
    out = model.model.decoder(input_ids=start, encoder_hidden_states=hidden, use_cache=False)
    logits = model.proj_out(out.last_hidden_state[:, -1])
    allowed = torch.full_like(logits[0], float("-inf"))
    allowed[list(gen.lang_to_id.values())] = 0
    return (logits + allowed).argmax(-1)


def prompts(model: nn.Module, hidden: torch.Tensor, language: str | None, task: str) -> torch.Tensor:
    """``[B, P]`` forced prompt tokens: :func:`mla_registry.whisper.prompt_ids`, with the language detected per
    row for a multilingual model given none."""
    ids = torch.tensor(whisper.prompt_ids(model, language, task), dtype=torch.long, device=hidden.device)
    ids = ids.expand(hidden.shape[0], -1).clone()
    if whisper.is_multilingual(model) and language is None:
        ids[:, 1] = detect_language(model, hidden)
    return ids


class LastLogits:
    """The output projection (51864 x d, the largest weight a step reads) for the last position, through a
    copy of the weight prepacked for oneDNN on CPU when this torch has it.

    Measured on the 2-core EPYC (bench/README.md): ``F.linear`` against the tied ``[vocab, d]`` weight took 1.6x
    to 2.7x the time of the prepacked call at batch 1 to 16, and about 2x the time of reading the weight once at
    batch 1; the tokens stay generate()'s (tests/test_decoding.py). The packed
    copy costs one more weight's memory (80 MB for tiny.en) and is made when the step is built: weights changed
    afterwards are not seen (evaluation builds one step per transcription)."""

    def __init__(self, proj_out: nn.Linear) -> None:
        self.proj_out = proj_out
        self.packed = None
        weight = proj_out.weight
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
                probe = weight.new_zeros((1, weight.shape[1]))
                torch.ops.mkldnn._linear_pointwise(probe, packed, proj_out.bias, "none", [], "")
                self.packed = packed
            except (RuntimeError, AttributeError):  # an op this build lacks: the plain projection is correct
                self.packed = None

    def __call__(self, last: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return self.proj_out(last)
        return torch.ops.mkldnn._linear_pointwise(last.contiguous(), self.packed, self.proj_out.bias, "none", [],
                                                  "")


# Graphs torch.compile may keep for the decoder call: each DecoderStep needs about three (the prefill, the steps,
# a batch narrowed to one row), and dynamo counts them per code object, i.e. over every DecoderStep of the process
# (its default of 8 sends the fourth compiled model back to eager without an error).
COMPILED_GRAPHS = 64


class DecoderStep:
    """One decoder call on ``ids`` with the cache, returning last-position logits ``[B, vocab]``.

    A separate object so that ``torch.compile`` can wrap exactly the decoder call (``compile=True``: inductor,
    dynamic shapes). Off by default and not offered by evaluation: on the 2-core CPU it took 19-47 s to compile
    per model and batch size, again when a decode meets a new batch size, and gained 0-9 % per step (25 % for
    one variant at batch 1) (bench/README.md, ``bench/decode.py --compile``)."""

    def __init__(self, model: nn.Module, compile: bool = False, packed_logits: bool = True) -> None:
        self.decoder = model.model.decoder
        self.logits = LastLogits(model.proj_out) if packed_logits else model.proj_out
        self.cache_kwarg = host_cache_kwarg()
        self.body = self._decode
        if compile:
            import torch._dynamo

            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_GRAPHS)
            self.body = torch.compile(self._decode, dynamic=True)

    def _decode(self, ids: torch.Tensor, hidden: torch.Tensor, cache) -> torch.Tensor:
        out = self.decoder(input_ids=ids, encoder_hidden_states=hidden, use_cache=True, **{self.cache_kwarg: cache})
        return out.last_hidden_state[:, -1]

    def __call__(self, ids: torch.Tensor, hidden: torch.Tensor, cache) -> torch.Tensor:
        return self.logits(self.body(ids, hidden, cache))


@torch.no_grad()
def greedy(model: nn.Module, hidden: torch.Tensor, max_new_tokens: int, language: str | None = None,
           task: str = "transcribe", min_new_tokens: int = 0, step: DecoderStep | None = None,
           clock: Callable[[], None] | None = None) -> GreedyResult:
    """Greedy decode of encoder output ``hidden [B, frames, d]``: ``max_new_tokens`` at most per row, stopping
    a row at end-of-text (not before ``min_new_tokens``: the benchmark's forced length). Tokens equal those of
    ``generate(num_beams=1, do_sample=False)`` with the same language and task (tests/test_decoding.py).

    ``clock``, when given, is called after every decoder call (the benchmark's step timer)."""
    batch, device = hidden.shape[0], hidden.device
    step = step or DecoderStep(model)
    prompt = prompts(model, hidden, language, task)
    vocab = model.proj_out.out_features
    suppress = Suppression(model, vocab, device, hidden.dtype)
    eos = _eos(model)
    eos_t = torch.tensor(eos, device=device)
    stamps: list[float] = [time.perf_counter()]

    def tick() -> None:
        if clock is not None:
            clock()
        stamps.append(time.perf_counter())

    cache = decoding_cache(len(model.model.decoder.layers), prompt.shape[1] + max_new_tokens)
    out = torch.full((batch, max_new_tokens), eos[0], dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)  # which original rows are still decoding
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    ids, kv = prompt, kvcache.KvBytes()
    steps = 0
    for i in range(max_new_tokens):
        logits = step(ids, hidden, cache)
        tick()
        if i == 0:
            kv = kvcache.measure(cache)  # cross cache complete, self cache holds the prompt
        logits = logits + (suppress.first if i == 0 else suppress.always)
        if i < min_new_tokens:
            logits[:, eos] = float("-inf")
        token = logits.argmax(-1)
        out[rows[alive], i] = token[alive]
        steps = i
        alive &= ~torch.isin(token, eos_t)
        if i + 1 == max_new_tokens:
            break
        live = int(alive.sum())
        if live == 0:
            break
        if len(alive) - live >= COMPACT_AT * len(alive):
            keep = alive.nonzero().squeeze(1)
            select_rows(cache, keep)
            hidden, rows, token = hidden.index_select(0, keep), rows[keep], token[keep]
            alive = alive[keep]
        ids = token.unsqueeze(1)
    per_token = kv.self_per_token
    kv.self_per_utterance = per_token * (prompt.shape[1] + steps)  # what generate's cache holds at the end
    return GreedyResult(torch.cat([prompt, out[:, : steps + 1]], dim=1), prompt.shape[1], steps, kv,
                        [b - a for a, b in zip(stamps, stamps[1:])])
