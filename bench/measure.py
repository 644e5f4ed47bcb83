"""Measuring helpers of the decoding benchmark: clocks, peak memory, copy bandwidth and matmul rate, the bytes
a decode step must move and the arithmetic it does, and one timed greedy decode through either decoder
(``generate()`` or mla-registry's loop).

Nothing here formats or compares: bench/decode.py runs these side by side and prints the table.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from typing import Any

import torch
from torch import nn

DECODERS = ("generate", "loop")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


class StepClock:
    """Stamps the clock once per decode step (after its forward). As a logits processor for ``generate()``
    (``__call__(input_ids, scores)``) or as the loop's ``clock`` callback (``tick()``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def tick(self) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.tick()
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


def _median_seconds(run, device: torch.device, reps: int) -> float:
    """Median wall time of ``run()`` over ``reps`` calls after one untimed call."""
    run()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth(device: torch.device, dtype: torch.dtype, mbytes: int = 256, reps: int = 5) -> float:
    """Bytes/s of a large tensor copy (counting read + write), median of ``reps``."""
    n = mbytes * 2**20 // torch.tensor([], dtype=dtype).element_size()
    src = torch.ones(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / _median_seconds(lambda: dst.copy_(src), device, reps)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a large square matmul (``2 n^3`` per product), median of ``reps``: what the machine's
    kernels reach on the easiest shape, the denominator of the arithmetic floor."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / _median_seconds(lambda: a @ b, device, reps)


def _count_cpu_kernels() -> None:
    """Teach ``FlopCounterMode`` the two CPU kernels a loop step calls that it does not count: PyTorch's CPU
    flash attention (with the formula it uses for the CUDA kernels, ``2 b h q k (d + d_v)``) and the prepacked
    oneDNN linear of the output projection (``2 rows in out``)."""
    from torch.utils import flop_counter

    def register(op, formula) -> None:
        if op is not None and op not in flop_counter.flop_registry and op.default not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)

    def sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def linear(input_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(out_shape) * input_shape[-1]

    register(getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None), sdpa)
    register(getattr(torch.ops.mkldnn, "_linear_pointwise", None), linear)


@torch.no_grad()
def step_flops(model: nn.Module, hidden: torch.Tensor, step=None) -> int:
    """Floating-point operations of one decode step of the loop after the prefill (the first generated token's
    step: the self cache holds the prompt and one token), counted by ``torch.utils.flop_counter`` over every
    matmul and attention call (element-wise work, softmax and norms are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mla_registry import decoding

    _count_cpu_kernels()
    counts: list[int] = []
    with FlopCounterMode(display=False) as counter:
        decoding.greedy(model, hidden, 2, min_new_tokens=2, step=step,
                        clock=lambda: counts.append(counter.get_total_flops()))
    return counts[1] - counts[0]


def decoder_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a decode step reads: every decoder parameter and the output projection (tied
    storage counted once), without the position table (a step reads one row of it)."""
    seen: set[int] = set()
    total = 0
    for module in (model.model.decoder, model.proj_out):
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


def count_tokens(sequences: torch.Tensor, eos: set[int]) -> int:
    """Tokens generated up to and including each row's first end-of-text."""
    return sum(next((j + 1 for j, t in enumerate(row) if t in eos), len(row)) for row in sequences.tolist())


def eos_ids(model: nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


@torch.no_grad()
def run_decode(decoder: str, model: nn.Module, hidden: torch.Tensor, steps: int, forced: bool,
               device: torch.device, track_memory: bool = False, step=None) -> dict[str, Any]:
    """One greedy decode of encoder output ``hidden`` through ``decoder`` (``generate`` or ``loop``):
    ``steps`` new tokens at most (exactly, end-of-text suppressed, when ``forced``); timings, tokens, the
    cache it held, and the generated sequences (prompt stripped)."""
    from mla_registry import whisper

    clock = StepClock(device)
    mem = PeakMemory(device) if track_memory else None
    sync(device)
    if mem:
        mem.start()
    t0 = time.perf_counter()
    if decoder == "generate":
        kv_self, kv_cross, length, sequences = _generate(model, hidden, steps, forced, clock)
    else:
        kv_self, kv_cross, length, sequences = _loop(model, hidden, steps, forced, clock, step)
    sync(device)
    t1 = time.perf_counter()
    if mem:
        mem.stop()
    seqs = sequences[:, len(whisper.prompt_ids(model)):]
    intervals = [b - a for a, b in itertools.pairwise([t0, *clock.stamps])]
    return {"seconds": t1 - t0, "tokens": count_tokens(seqs, eos_ids(model)), "steps": seqs.shape[1],
            "prefill": intervals[0] if intervals else None, "step_times": intervals[1:], "kv_self": kv_self,
            "kv_cross": kv_cross, "self_length": length, "peak_bytes": mem.peak if mem else None,
            "sequences": seqs}


def _generate(model, hidden, steps, forced, clock):
    from transformers import LogitsProcessorList
    from transformers.modeling_outputs import BaseModelOutput

    kwargs: dict[str, Any] = {"max_new_tokens": steps}
    if forced:
        kwargs["min_new_tokens"] = steps  # suppresses end-of-text until `steps` tokens are generated
    out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), num_beams=1, do_sample=False,
                         return_dict_in_generate=True, logits_processor=LogitsProcessorList([clock]), **kwargs)
    return (*cache_bytes(out.past_key_values), out.sequences)


def _loop(model, hidden, steps, forced, clock, step):
    from mla_registry import decoding

    res = decoding.greedy(model, hidden, steps, min_new_tokens=steps if forced else 0, step=step, clock=clock.tick)
    batch = hidden.shape[0]
    # the loop drops finished rows, so its cache is empty at the end: report what generate's would hold
    # (the per-sample figures measured after the prefill, scaled to the final length)
    return (int(res.kv.self_per_utterance * batch), int(res.kv.cross_per_utterance * batch),
            res.prompt_length + res.steps, res.sequences)


def same_tokens(a: torch.Tensor, b: torch.Tensor, eos: set[int]) -> bool:
    """Whether two decodes produced the same tokens per row, up to and including the first end-of-text
    (what follows is padding, whose width differs between the decoders)."""
    def cut(row: list[int]) -> list[int]:
        return row[: next((j + 1 for j, t in enumerate(row) if t in eos), len(row))]

    return [cut(r) for r in a.tolist()] == [cut(r) for r in b.tolist()]
