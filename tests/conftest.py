"""Shared fixtures: an isolated cache, a tiny random-weight Whisper, and installing a plugin through real
entry-point metadata (a ``*.dist-info`` directory on ``sys.path``)."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from mla_registry import registry


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests build their models and datasets in a cache of their own, shared by the session."""
    mp = pytest.MonkeyPatch()
    import os

    mp.setenv("MLA_REGISTRY_CACHE", os.environ.get("MLA_REGISTRY_TEST_CACHE") or str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """``install_plugin(dist, {entry_name: module_name}, {module_name: source})``: a distribution with entry points
    in the ``mla_registry`` group, found by importlib.metadata exactly like a pip-installed one."""

    def install(dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
        site = tmp_path / f"site-{dist}"
        site.mkdir()
        for mod, source in modules.items():
            (site / f"{mod}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[mla_registry]\n{lines}")
        monkeypatch.syspath_prepend(str(site))
        importlib.invalidate_caches()
        registry.reset()
        return site

    yield install
    registry.reset()
    for mod in list(sys.modules):
        if mod.startswith("tp_"):
            del sys.modules[mod]


@pytest.fixture(scope="session")
def tiny_model():
    """A factory of tiny random-weight Whisper models (same seed, same weights)."""
    return tiny_whisper


def tiny_whisper(seed: int = 0, d_model: int = 64, heads: int = 4, layers: int = 2):
    """A random-weight Whisper small enough for unit tests, with an English-only generation config."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=51864, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, num_mel_bins=80, max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, bos_token_id=50256,
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, bos_token_id=50256,
        no_timestamps_token_id=50362, max_length=448, is_multilingual=False,
        forced_decoder_ids=None, suppress_tokens=[], begin_suppress_tokens=[50256],
    )
    return model
