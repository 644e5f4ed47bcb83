"""Every generated bad input is a clear error naming what is at fault; every valid one gives its correct result
(README in this folder: the cases, the outcome classes, the counts before and after the fixes)."""

from __future__ import annotations

import pytest
import safetensors.torch

from mla_registry import checkpoint, model_refs, surgery
from mla_registry.testing import tiny_whisper

from .cases import Env, all_cases, clip_dir, pickle_payload, remote_code
from .harness import CLEAR, MARKER, OK, run_case

CASES = all_cases()
OUTCOMES: dict[str, tuple[str, str]] = {}  # case id -> (outcome class, detail), counted by this folder's conftest


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    """One converted tiny checkpoint (MLA on the decoder, SVD-initialised: no calibration audio), built once."""
    root = tmp_path_factory.mktemp("badinput")
    model = tiny_whisper()
    surgery.replace_slots(model, [surgery.parse_spec("decoder.*=mla:rank=16,init=svd")], None)
    base = checkpoint.save(model, root / "base", model_refs.load_processor("bundled:whisper-tiny.en"))
    state = safetensors.torch.load_file(base / "model.safetensors")
    return Env(base=base, state=state, clips=clip_dir(root / "clips"), root=root)


def test_the_code_execution_payloads_are_live(tmp_path, monkeypatch):
    """The "no code runs" cases mean something only if their payloads would run: unpickling the pickle beside
    the weights, or importing the checkpoint's modeling file, does create the marker file."""
    import importlib.util
    import pickle

    monkeypatch.chdir(tmp_path)
    pickle.loads(pickle_payload())  # the point: this payload runs code when unpickled
    assert (tmp_path / MARKER).read_text().strip() == "pickle"
    (tmp_path / MARKER).unlink()
    (tmp_path / "config.json").write_text("{}")
    remote_code(tmp_path)
    spec = importlib.util.spec_from_file_location("modeling_evil", tmp_path / "modeling_evil.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert (tmp_path / MARKER).read_text() == "auto_map"


def test_there_are_enough_cases():
    assert len(CASES) >= 200
    assert {c.kind for c in CASES} == {"checkpoint", "model", "experiment", "data", "cli"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, env, tmp_path):
    outcome = run_case(case, env, tmp_path / "case")
    OUTCOMES[case.id] = (outcome.kind, outcome.detail)
    want = OK if case.valid else CLEAR
    assert outcome.kind == want, f"{case.id}: {outcome.kind}: {outcome.detail}"
