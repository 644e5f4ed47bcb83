"""Fixtures for the command-line tests: a tiny random-weight Whisper saved with the bundled processor."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mla_registry import checkpoint, model_refs


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("base") / "tiny"
    checkpoint.save(tiny_model(), path, model_refs.load_processor("bundled:whisper-tiny.en"))
    return path


@pytest.fixture
def invoke():
    """``invoke(*args)`` runs ``mla-registry ARGS`` through click (the group's error handling included)."""
    from mla_registry.cli.main import cli

    def run(*args: str):
        return CliRunner().invoke(cli, [str(a) for a in args])

    return run
