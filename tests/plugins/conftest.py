"""Fixtures for the plugin tests: the conformance kit's tiny random-weight Whisper (2+2 layers, d_model 64,
4 heads, 50 encoder frames, varied outputs, non-zero biases), its calibration context, and a helper that
converts slots through surgery exactly as ``mla-registry convert`` does."""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.utils import logging as hf_logging

from mla_registry import surgery, testing, whisper
from mla_registry.builder import AttentionBuilder

hf_logging.set_verbosity_error()

D_MODEL, HEADS, FRAMES, VOCAB = 64, 4, 50, testing.SMALL_VOCAB


def tiny_model(seed: int = 0) -> nn.Module:
    return testing.tiny_whisper(seed, vocab=VOCAB, frames=FRAMES, init_std=0.3, random_biases=True)


def swap(model: nn.Module, builder: AttentionBuilder, kinds: tuple[str, ...] = whisper.KINDS,
         context: testing.ForwardContext | None = None, **kwargs) -> nn.Module:
    """Convert every slot of ``model`` whose kind is in ``kinds`` with ``builder`` (through surgery)."""
    with testing.registered(builder):
        surgery.replace_slots(model, [surgery.AttentionSpec("+".join(kinds), builder.name, kwargs)], context)
    return model


@pytest.fixture(scope="session")
def stock() -> nn.Module:
    """The stock tiny model (do not modify: use ``fresh``)."""
    return tiny_model()


@pytest.fixture
def fresh(stock) -> Callable[[], nn.Module]:
    """Factory of deep copies of the stock model, free to convert."""
    return lambda: copy.deepcopy(stock)


@pytest.fixture(scope="session")
def context(stock) -> testing.ForwardContext:
    """Calibration inputs of every slot of the stock model (random audio, teacher-forced)."""
    return testing.ForwardContext(stock)


@pytest.fixture(scope="session")
def features(stock) -> torch.Tensor:
    return testing.random_features(stock)


@pytest.fixture(scope="session")
def decoder_ids(stock) -> torch.Tensor:
    return testing.random_tokens(stock)


def greedy(model: nn.Module, features: torch.Tensor, **kw) -> torch.Tensor:
    """Generated token ids (12 new tokens; greedy unless ``num_beams`` is given)."""
    with torch.no_grad():
        return model.generate(features, max_new_tokens=12, **kw)


def logits(model: nn.Module, features: torch.Tensor, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=ids, **kw).logits


@pytest.fixture
def h() -> SimpleNamespace:
    """Shared helpers (pytest's importlib mode means tests cannot import this conftest as a module)."""
    return SimpleNamespace(greedy=greedy, logits=logits, swap=swap, tiny_model=tiny_model, D_MODEL=D_MODEL,
                           HEADS=HEADS, FRAMES=FRAMES, VOCAB=VOCAB)
