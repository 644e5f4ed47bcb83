"""The conformance kit for attention plugins: one table of kwargs cases through every contract check.

A plugin author runs it in one line of a pytest file::

    from mla_registry.testing import conformance_test
    test_mqa = conformance_test(MqaBuilder(), [{"pool": "mean"}, {"pool": "first"}])

(each (case, check) pair becomes one test), or outside pytest ``check_plugin(MqaBuilder(), cases)``, which raises
``AssertionError`` listing every failure. The checks, on a tiny random-weight Whisper whose slots of ``kinds``
(default: every slot) are converted through :mod:`mla_registry.surgery` exactly as ``mla-registry convert`` does:

- ``roundtrip``: saved with :func:`mla_registry.checkpoint.save` and rebuilt by :func:`~mla_registry.checkpoint.load`
  (in a fresh Python process when the plugin is installed through its entry point): identical greedy tokens and
  logits;
- ``causal``: in training mode without a decoder mask, a later token never changes earlier logits;
- ``cache``: the cache ``generate()`` really holds equals what ``kv_cache_bytes_per_token()`` declares;
- ``equivalences``: each :class:`~mla_registry.builder.Equivalence` the builder declares holds;
- ``backward``: a teacher-forced loss reaches every parameter of every converted module;
- ``parameter_groups``: the declared groups name parameters the module has;
- ``bf16``: bfloat16 forward and greedy decoding give finite outputs; ``cuda``: the same on a GPU (skipped
  without one).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint, kvcache, lineage, registry, surgery, whisper
from .builder import AttentionBuilder, Slot

SMALL_VOCAB = 128


def tiny_whisper(seed: int = 0, d_model: int = 64, heads: int = 4, layers: int = 2, vocab: int = 51864,
                 frames: int = 1500, init_std: float = 0.02, random_biases: bool = False) -> nn.Module:
    """A random-weight Whisper small enough for unit tests, in eval mode. With the real vocabulary (51864) it
    takes the bundled tokenizer's special ids and an English-only generation config; with a small one
    (``vocab < 51864``) start/end/pad are 1/2/0. ``init_std=0.3`` and ``random_biases`` make greedy outputs vary
    and biases count (plugin tests)."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    real = vocab >= 51864
    start, eos, pad = (50257, 50256, 50256) if real else (1, 2, 0)
    config = WhisperConfig(
        vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, num_mel_bins=80, max_source_positions=frames,
        max_target_positions=448 if real else 64, decoder_start_token_id=start, eos_token_id=eos,
        pad_token_id=pad, bos_token_id=eos, init_std=init_std, suppress_tokens=None, begin_suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(config).eval()
    if random_biases:
        with torch.no_grad():  # transformers zero-initialises biases; random ones make the bias handling count
            for module in model.modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
    gen = dict(decoder_start_token_id=start, eos_token_id=eos, pad_token_id=pad, bos_token_id=eos,
               max_length=config.max_target_positions, is_multilingual=False, forced_decoder_ids=None,
               suppress_tokens=[], begin_suppress_tokens=[eos])
    if real:
        gen["no_timestamps_token_id"] = 50362
    model.generation_config = GenerationConfig(**gen)
    return model


def random_features(model: nn.Module, batch: int = 3, seed: int = 7) -> torch.Tensor:
    """Random log-mel input ``[batch, 80, 2 * encoder positions]`` for ``model``."""
    frames = 2 * model.config.max_source_positions
    return torch.randn(batch, model.config.num_mel_bins, frames, generator=torch.Generator().manual_seed(seed))


def random_tokens(model: nn.Module, batch: int = 3, length: int = 12, seed: int = 8) -> torch.Tensor:
    """Teacher-forced decoder tokens starting with the decoder start token."""
    high = min(model.config.vocab_size, 50000)
    ids = torch.randint(3, high, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = model.generation_config.decoder_start_token_id
    return ids


class ForwardContext:
    """A :class:`~mla_registry.builder.ConversionContext` whose calibration inputs are what each slot saw in one
    teacher-forced forward pass of the unconverted model on random audio (no dataset needed)."""

    def __init__(self, model: nn.Module, batch: int = 4, tokens: int = 24, seed: int = 1) -> None:
        self.kv: dict[str, torch.Tensor] = {}
        self.query: dict[str, torch.Tensor] = {}
        hooks = []
        for slot in whisper.slots(model):
            def grab(module, args, kwargs, slot=slot):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                self.query[slot.path] = hidden.detach().reshape(-1, hidden.shape[-1]).clone()
                source = kwargs.get("key_value_states") if slot.is_cross else hidden
                self.kv[slot.path] = source.detach().reshape(-1, source.shape[-1]).clone()
            hooks.append(model.get_submodule(slot.path).register_forward_pre_hook(grab, with_kwargs=True))
        try:
            with torch.no_grad():
                model(input_features=random_features(model, batch, seed),
                      decoder_input_ids=random_tokens(model, batch, tokens, seed + 1), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        self.used = {"ref": "random features (mla_registry.testing.ForwardContext)"}
        self.model = model

    def original(self, slot: Slot) -> nn.Module:
        return self.model.get_submodule(slot.path)

    def calibration_inputs(self, slot: Slot) -> torch.Tensor:
        return self.kv[slot.path]

    def query_inputs(self, slot: Slot) -> torch.Tensor:
        return self.query[slot.path]


@contextlib.contextmanager
def registered(builder: AttentionBuilder) -> Iterator[None]:
    """Make ``builder`` the one its name resolves to in this process (whether or not it is installed)."""
    reg = registry.get_registry()
    before = reg.builders.get(builder.name)
    reg.builders[builder.name] = builder
    try:
        yield
    finally:
        if before is None:
            reg.builders.pop(builder.name, None)
        else:
            reg.builders[builder.name] = before


def _selector(kinds: tuple[str, ...]) -> str:
    return "+".join(kinds)


def _spec(builder: AttentionBuilder, kinds: tuple[str, ...], kwargs: dict[str, Any]) -> surgery.AttentionSpec:
    return surgery.AttentionSpec(_selector(kinds), builder.name, dict(kwargs))


@dataclass
class Case:
    """One (builder, kwargs) case and what its checks share: the stock model, inputs, a calibration context."""

    builder: AttentionBuilder
    kwargs: dict[str, Any]
    kinds: tuple[str, ...] = whisper.KINDS
    stock: nn.Module = field(default_factory=lambda: tiny_whisper(vocab=SMALL_VOCAB, frames=50, init_std=0.3,
                                                                  random_biases=True))

    def __post_init__(self) -> None:
        self.features = random_features(self.stock)
        self.tokens = random_tokens(self.stock)
        self.context = ForwardContext(self.stock)

    def convert(self, **overrides: Any) -> nn.Module:
        model = copy.deepcopy(self.stock)
        with registered(self.builder):
            surgery.replace_slots(model, [_spec(self.builder, self.kinds, {**self.kwargs, **overrides})],
                                  self.context)
        return model.eval()

    def __str__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.builder.name}({args})"


def _logits(model: nn.Module, case: Case, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_features=case.features, decoder_input_ids=case.tokens, **kw).logits


def _greedy(model: nn.Module, features: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(features, max_new_tokens=10, **kw)


def check_roundtrip(case: Case) -> None:
    """Save, rebuild with the loader, compare tokens and logits (a fresh process when the plugin is installed)."""
    model = case.convert()
    with tempfile.TemporaryDirectory(prefix="mla-registry-conformance-") as tmp:
        path = Path(tmp) / "ckpt"
        checkpoint.save(model, path)
        with registered(case.builder):
            loaded = checkpoint.load(path)
        assert torch.equal(_greedy(model, case.features), _greedy(loaded, case.features)), \
            f"{case}: greedy tokens of the reloaded checkpoint differ"
        torch.testing.assert_close(_logits(loaded, case), _logits(model, case), atol=1e-6, rtol=0)
        if _installed(case.builder):
            _fresh_process_tokens_equal(case, model, path)


def _installed(builder: AttentionBuilder) -> bool:
    """Whether a fresh process would find ``builder`` through its entry point (the same class)."""
    found = registry.discover().builders.get(builder.name)
    return found is not None and type(found).__qualname__ == type(builder).__qualname__


_FRESH = r"""
import json, sys, torch
from mla_registry import checkpoint
from safetensors.torch import load_file
model = checkpoint.load(sys.argv[1])
features = load_file(sys.argv[2])["features"]
with torch.no_grad():
    print(json.dumps(model.generate(features, max_new_tokens=10).tolist()))
"""


def _fresh_process_tokens_equal(case: Case, model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    feats = path.parent / "features.safetensors"
    save_file({"features": case.features.contiguous()}, str(feats))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", _FRESH, str(path), str(feats)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, f"{case}: loading in a fresh process failed:\n{proc.stderr[-3000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == _greedy(model, case.features).tolist(), f"{case}: a fresh process decodes other tokens"


def check_causal(case: Case) -> None:
    """Training mode, no decoder mask (what SDPA's decoder passes): changing token 8 leaves logits 0..7 alone."""
    model = case.convert()
    if not any(k.startswith("decoder.self") for k in case.kinds):
        return
    seen: list[object] = []
    hooks = [model.get_submodule(s.path).register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("attention_mask")), with_kwargs=True)
        for s in whisper.slots(model) if s.kind == "decoder.self"]
    changed = case.tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % model.config.vocab_size
    model.train()
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            a = model(input_features=case.features, decoder_input_ids=case.tokens).logits
            torch.manual_seed(0)
            b = model(input_features=case.features, decoder_input_ids=changed).logits
    finally:
        model.eval()
        for h in hooks:
            h.remove()
    assert seen and all(m is None for m in seen), "the decoder passed a mask: causality is not under test"
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-5, rtol=0, msg=f"{case}: the future leaks into the past")
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4, f"{case}: a changed token changes nothing after it"


def check_cache(case: Case) -> None:
    """The cache after ``generate()`` holds exactly the declared bytes (self per token, cross per frame)."""
    model = case.convert()
    with torch.no_grad():
        out = model.generate(case.features, max_new_tokens=6, return_dict_in_generate=True)
    held = kvcache.measure(out.past_key_values)
    self_declared, cross_declared = kvcache.declared(model)
    assert held.self_per_token == self_declared, \
        f"{case}: self-attention cache holds {held.self_per_token} B/token, modules declare {self_declared}"
    assert held.cross_per_frame == cross_declared, \
        f"{case}: cross-attention cache holds {held.cross_per_frame} B/frame, modules declare {cross_declared}"


def check_equivalences(case: Case) -> None:
    """Every equivalence the builder declares for the slots it converts."""
    slot = next(s for s in whisper.slots(case.stock) if s.kind in case.kinds)
    for eq in case.builder.equivalences(slot):
        a = case.convert(**eq.kwargs)
        b = case.stock if eq.reference is None else case.convert(**eq.reference)
        for kw in ({}, {"use_cache": True}):
            torch.testing.assert_close(_logits(a, case, **kw), _logits(b, case, **kw), atol=eq.atol, rtol=0,
                                       msg=lambda m, eq=eq: f"{case}: {eq.what}: {m}")
        assert torch.equal(_greedy(a, case.features), _greedy(b, case.features)), f"{case}: {eq.what}: tokens"
        assert torch.equal(_greedy(a, case.features, num_beams=3), _greedy(b, case.features, num_beams=3)), \
            f"{case}: {eq.what}: beam-search tokens"


def check_backward(case: Case) -> None:
    """A teacher-forced loss reaches every trainable parameter of every converted module, and none that the
    plugin fixed (``requires_grad=False``, e.g. MLA's shared cross-attention ``kv_down``)."""
    model = case.convert().train()
    loss = model(input_features=case.features, decoder_input_ids=case.tokens[:, :-1],
                 labels=case.tokens[:, 1:]).loss
    loss.backward()
    assert torch.isfinite(loss), f"{case}: loss is {loss}"
    for rec in lineage.of(model).slots:
        for name, p in model.get_submodule(rec.path).named_parameters():
            if not p.requires_grad:
                assert p.grad is None, f"{case}: {rec.slot}.{name} is fixed but got a gradient"
                continue
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{case}: {rec.slot}.{name} got no gradient"


def check_parameter_groups(case: Case) -> None:
    """Each declared group names existing parameters; groups do not overlap."""
    model = case.convert()
    rec = lineage.of(model).slots[0]
    names = [n for n, _ in model.get_submodule(rec.path).named_parameters()]
    owner: dict[str, str] = {}
    for group, prefixes in case.builder.parameter_groups.items():
        hits = [n for n in names if n.startswith(tuple(prefixes))]
        assert hits, f"{case}: parameter group {group!r} ({', '.join(prefixes)}) matches no parameter of {names}"
        for n in hits:
            assert n not in owner, f"{case}: parameter {n} is in groups {owner[n]!r} and {group!r}"
            owner[n] = group


def _dtype_run(case: Case, device: str, dtype: torch.dtype) -> None:
    model = case.convert().to(device=device, dtype=dtype)
    feats = case.features.to(device=device, dtype=dtype)
    with torch.no_grad():
        out = model(input_features=feats, decoder_input_ids=case.tokens.to(device), use_cache=True).logits
    assert out.dtype == dtype and torch.isfinite(out).all(), f"{case}: non-finite {dtype} logits on {device}"
    _greedy(model, feats)


def check_bf16(case: Case) -> None:
    _dtype_run(case, "cpu", torch.bfloat16)


def check_cuda(case: Case) -> None:
    """Float32 logits on CUDA within 2e-4 of the CPU's, and bfloat16 decoding (skipped without a GPU)."""
    if not torch.cuda.is_available():
        raise _Skip("no CUDA GPU")
    model = case.convert()
    cpu = _logits(model, case)
    with torch.no_grad():
        gpu = model.cuda()(input_features=case.features.cuda(), decoder_input_ids=case.tokens.cuda()).logits
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-4, rtol=0)
    _dtype_run(case, "cuda", torch.bfloat16)


def check_stock(case: Case) -> None:
    """A builder with ``to_stock()``: the stock model it gives (``export --to transformers``) has the converted
    model's logits (1e-4) and greedy tokens. Without one: skipped (the stock formats refuse it by name)."""
    from .builder import AttentionBuilder
    from .export.stock import stock_model

    if type(case.builder).to_stock is AttentionBuilder.to_stock:
        raise _Skip("no to_stock(): exports to ONNX only")
    model = case.convert()
    with registered(case.builder):
        stock = stock_model(model)
    torch.testing.assert_close(_logits(stock, case), _logits(model, case), atol=1e-4, rtol=0,
                               msg=lambda m: f"{case}: stock export: {m}")
    assert torch.equal(_greedy(stock, case.features), _greedy(model, case.features)), \
        f"{case}: greedy tokens of the stock export differ"


class _Skip(Exception):
    pass


CHECKS: dict[str, Callable[[Case], None]] = {
    "roundtrip": check_roundtrip, "causal": check_causal, "cache": check_cache,
    "equivalences": check_equivalences, "backward": check_backward, "parameter_groups": check_parameter_groups,
    "stock": check_stock, "bf16": check_bf16, "cuda": check_cuda,
}


def check_plugin(builder: AttentionBuilder, cases: list[dict[str, Any]], kinds: tuple[str, ...] = whisper.KINDS,
                 checks: tuple[str, ...] = tuple(CHECKS)) -> dict[str, str]:
    """Run every check on every case; returns ``{"case: check": "ok" | "skipped: why"}`` and raises
    ``AssertionError`` listing all failures."""
    results, failures = {}, []
    for kwargs in cases:
        case = Case(builder, dict(kwargs), kinds)
        for name in checks:
            key = f"{case}: {name}"
            try:
                CHECKS[name](case)
                results[key] = "ok"
            except _Skip as why:
                results[key] = f"skipped: {why}"
            except AssertionError as exc:
                failures.append(f"{key}: {exc}")
    if failures:
        raise AssertionError(f"{len(failures)} conformance failure(s):\n" + "\n".join(failures))
    return results


def conformance_test(builder: AttentionBuilder, cases: list[dict[str, Any]],
                     kinds: tuple[str, ...] = whisper.KINDS, checks: tuple[str, ...] = tuple(CHECKS)) -> Callable:
    """A pytest test function parametrised over every (case, check): assign it to a ``test_*`` name."""
    import pytest

    shared: dict[int, Case] = {}

    def case_of(i: int) -> Case:
        if i not in shared:
            shared[i] = Case(builder, dict(cases[i]), kinds)
        return shared[i]

    params = [pytest.param(i, name, id=f"{builder.name}({','.join(f'{k}={v}' for k, v in c.items())})-{name}")
              for i, c in enumerate(cases) for name in checks]

    @pytest.mark.parametrize(("case_index", "check"), params)
    def test(case_index: int, check: str) -> None:
        try:
            CHECKS[check](case_of(case_index))
        except _Skip as why:
            pytest.skip(str(why))

    return test
