"""Shared fixtures: an isolated cache, a tiny random-weight Whisper, a reference cross entropy, and installing a
plugin through real entry-point metadata (a ``*.dist-info`` directory on ``sys.path``)."""

from __future__ import annotations

import importlib
import importlib.metadata
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
        _installed.add(dist)
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
    _installed.clear()
    registry.reset()
    for mod in list(sys.modules):
        if mod.startswith("tp_"):
            del sys.modules[mod]


@pytest.fixture(scope="session")
def tiny_model():
    """A factory of tiny random-weight Whisper models with the real vocabulary (same seed, same weights)."""
    from mla_registry.testing import tiny_whisper

    return tiny_whisper


@pytest.fixture(scope="session")
def reference_ce():
    """``reference_ce(model, processor, utts)``: the model's own loss (transformers' label cross entropy,
    token-weighted) on the transcripts of ``utts`` in one batch: what a validation CE must equal."""
    import torch

    from mla_registry import whisper

    def ce(model, processor, utts) -> float:
        feats = whisper.input_features(processor, [u.audio for u in utts])
        ids, labels, _ = whisper.teacher_forcing(model, processor.tokenizer, [u.text for u in utts])
        with torch.no_grad():
            return float(model.eval()(input_features=feats, decoder_input_ids=ids, labels=labels).loss)

    return ce


@pytest.fixture(autouse=True)
def _isolated_plugins(monkeypatch):
    """Discovery sees this package's own entry points and those a test installs (install_plugin), never an
    unrelated plugin of the environment the tests run in (as llm's tests isolate theirs)."""
    real = importlib.metadata.entry_points
    ours = {"mla-registry"}

    def entry_points(**kw):
        eps = real(**kw)
        if kw.get("group") != registry.ENTRY_POINT_GROUP:
            return eps
        return [ep for ep in eps if ep.dist is None or ep.dist.name in ours or ep.dist.name in _installed]

    monkeypatch.setattr(registry.importlib.metadata, "entry_points", entry_points)
    registry.reset()
    yield
    registry.reset()


_installed: set[str] = set()
