"""Fixtures for the attention plugin tests: a tiny random-weight Whisper, a slot-swapping helper and a
calibration context that captures each slot's real inputs from a forward pass of the stock model."""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.utils import logging as hf_logging

from mla_registry.builder import AttentionBuilder, Slot
from mla_registry.families import whisper

hf_logging.set_verbosity_error()

D_MODEL, HEADS, FRAMES, VOCAB = 64, 4, 50, 128  # FRAMES: encoder positions (mel frames / 2)


def tiny_model(seed: int = 0) -> WhisperForConditionalGeneration:
    """A 2+2-layer Whisper (d_model 64, 4 heads, 50 encoder frames) whose greedy outputs vary (init_std 0.3)
    and whose biases are non-zero."""
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=80, d_model=D_MODEL, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
        encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=FRAMES, max_target_positions=64, decoder_start_token_id=1, eos_token_id=2,
        pad_token_id=0, bos_token_id=2, suppress_tokens=None, begin_suppress_tokens=None, init_std=0.3,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers zero-initialises biases; random ones make the bias handling count
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    return model


class CapturedContext:
    """A :class:`mla_registry.builder.ConversionContext` whose calibration inputs are the inputs each slot's
    K/V projections saw in one teacher-forced forward pass of the stock model on random audio."""

    def __init__(self, model: nn.Module, seed: int = 1, batch: int = 4, tokens: int = 24) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        gen = torch.Generator().manual_seed(seed)
        features = torch.randn(batch, 80, 2 * FRAMES, generator=gen)
        decoder_ids = torch.randint(3, VOCAB, (batch, tokens), generator=gen)
        hooks = []
        for slot in whisper.slots(model):
            def grab(module, args, kwargs, slot=slot):
                x = kwargs.get("key_value_states") if slot.is_cross else kwargs.get("hidden_states", None)
                if x is None:
                    x = args[0]
                self.inputs[slot.path] = x.detach().reshape(-1, x.shape[-1]).clone()
            hooks.append(model.get_submodule(slot.path).register_forward_pre_hook(grab, with_kwargs=True))
        try:
            with torch.no_grad():
                model(input_features=features, decoder_input_ids=decoder_ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        self.calls: list[tuple[str, str, int]] = []

    def calibration_inputs(self, slot: Slot, data: str, size: int) -> torch.Tensor:
        self.calls.append((slot.path, data, size))
        return self.inputs[slot.path]


def swap(
    model: nn.Module, builder: AttentionBuilder, kinds: tuple[str, ...] = whisper.KINDS,
    context: CapturedContext | None = None, **kwargs,
) -> nn.Module:
    """Replace every attention slot of ``model`` whose kind is in ``kinds`` by ``builder.convert(...)``."""
    kwargs = builder.validate(kwargs)
    for slot in whisper.slots(model):
        if slot.kind not in kinds:
            continue
        builder.check_slot(slot, kwargs)
        parent_path, _, child = slot.path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, child, builder.convert(getattr(parent, child), slot, context, **kwargs))
    return model


@pytest.fixture(scope="session")
def stock() -> WhisperForConditionalGeneration:
    """The stock tiny model (do not modify: use ``fresh``)."""
    return tiny_model()


@pytest.fixture
def fresh(stock) -> Callable[[], WhisperForConditionalGeneration]:
    """Factory of deep copies of the stock model, free to convert."""
    return lambda: copy.deepcopy(stock)


@pytest.fixture(scope="session")
def context(stock) -> CapturedContext:
    """Calibration inputs of every slot of the stock model (random audio, teacher-forced)."""
    return CapturedContext(stock)


@pytest.fixture(scope="session")
def features() -> torch.Tensor:
    """Random log-mel input for 3 utterances."""
    return torch.randn(3, 80, 2 * FRAMES, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def decoder_ids() -> torch.Tensor:
    """12 teacher-forced decoder tokens per utterance, starting with the decoder start token."""
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(8))
    ids[:, 0] = 1
    return ids


def greedy(model: nn.Module, features: torch.Tensor, **kw) -> torch.Tensor:
    """Generated token ids (12 new tokens; greedy unless ``num_beams`` is given)."""
    with torch.no_grad():
        return model.generate(features, max_new_tokens=12, **kw)


def logits(model: nn.Module, features: torch.Tensor, ids: torch.Tensor, **kw) -> torch.Tensor:
    """Teacher-forced logits of ``ids``."""
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=ids, **kw).logits


def assert_causal(model: nn.Module, features: torch.Tensor, ids: torch.Tensor) -> None:
    """In training mode with no decoder mask (what SDPA's decoder passes), changing a later decoder token must
    leave earlier positions' logits unchanged. Also checks that self-attention really got ``mask=None``."""
    seen: list[object] = []
    hooks = [model.get_submodule(s.path).register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("attention_mask")), with_kwargs=True)
        for s in whisper.slots(model) if s.kind == "decoder.self"]
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % VOCAB
    model.train()
    try:
        with torch.no_grad():
            a = model(input_features=features, decoder_input_ids=ids).logits
            b = model(input_features=features, decoder_input_ids=changed).logits
    finally:
        model.eval()
        for h in hooks:
            h.remove()
    assert seen and all(m is None for m in seen), "the decoder passed a mask: causality is not under test"
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-5, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3  # the change does reach the later positions


def cache_bytes(model: nn.Module, features: torch.Tensor, which: str) -> tuple[float, int]:
    """(measured cache bytes per token per sample summed over decoder layers, the modules' claimed sum) for
    ``which`` in {"self", "cross"}, from a real ``generate(..., return_dict_in_generate=True)``."""
    with torch.no_grad():
        out = model.generate(features, max_new_tokens=6, return_dict_in_generate=True)
    cache = getattr(out.past_key_values, f"{which}_attention_cache")
    measured = 0.0
    for layer in cache.layers:
        batch, tokens = layer.keys.shape[0], layer.keys.shape[-2]
        measured += (layer.keys.nbytes + layer.values.nbytes) / (batch * tokens)
    kind = "decoder.self" if which == "self" else "decoder.cross"
    claimed = sum(model.get_submodule(s.path).kv_cache_bytes_per_token()
                  for s in whisper.slots(model) if s.kind == kind)
    return measured, claimed


def assert_roundtrip(builder: AttentionBuilder, model: nn.Module, features: torch.Tensor, ids: torch.Tensor,
                     **kwargs) -> None:
    """Rebuilding every converted slot with ``build(slot, **build_kwargs)`` and loading its state dict
    strictly gives the same logits (what the checkpoint loader does)."""
    reference = logits(model, features, ids)
    kwargs = builder.validate(kwargs)
    for slot in whisper.slots(model):
        parent_path, _, child = slot.path.rpartition(".")
        parent = model.get_submodule(parent_path)
        rebuilt = builder.build(slot, **builder.build_kwargs(kwargs))
        rebuilt.load_state_dict(getattr(parent, child).state_dict(), strict=True)
        setattr(parent, child, rebuilt.eval())
    torch.testing.assert_close(logits(model, features, ids), reference, atol=0, rtol=0)


def assert_backward(
    model: nn.Module, features: torch.Tensor, ids: torch.Tensor, names: tuple[str, ...]
) -> None:
    """A teacher-forced loss backpropagates into the named parameters of every converted attention module."""
    model.train()
    loss = model(input_features=features, decoder_input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    model.eval()
    assert torch.isfinite(loss)
    for slot in whisper.slots(model):
        module = model.get_submodule(slot.path)
        for name in names:
            grad = module.get_parameter(name).grad
            assert grad is not None and grad.abs().sum() > 0, f"{slot.name}.{name} got no gradient"


@pytest.fixture
def h() -> SimpleNamespace:
    """Shared helpers (pytest's importlib mode means tests cannot import this conftest as a module)."""
    return SimpleNamespace(
        greedy=greedy, logits=logits, swap=swap, tiny_model=tiny_model, CapturedContext=CapturedContext,
        assert_causal=assert_causal, cache_bytes=cache_bytes, assert_roundtrip=assert_roundtrip,
        assert_backward=assert_backward, D_MODEL=D_MODEL, HEADS=HEADS, FRAMES=FRAMES, VOCAB=VOCAB,
    )
