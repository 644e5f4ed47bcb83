"""Check that this installation (its transformers, torch, torchcodec) converts, saves, reloads and decodes every
built-in plugin correctly: the smoke test ``.ci/newest`` runs before a dependency bound is raised, and what
``mla-registry selftest`` runs for a user who installed into an existing environment.

For each built-in plugin: convert the bundled Whisper tiny.en, decode real clips greedily with the cache and
without it (they must agree: a host that passes the cache under a new name breaks exactly this), save the
checkpoint, reload every checkpoint in a fresh Python process and decode the same clips there (tokens must equal
the saved model's).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from . import __version__

CLIPS = "builtin:real?source=librispeech_test_clean"
CALIBRATION = "builtin:real?source=librispeech_dev_clean"
CASES = {  # name -> attention spec over decoder self + cross
    "mha": "decoder.*=mha",
    "gqa": "decoder.*=gqa:kv_heads=2",
    "mla-activation": "decoder.*=mla:rank=192",
    "mla-svd": "decoder.*=mla:rank=96,init=svd",
}
MAX_NEW_TOKENS = 48

_FRESH = r"""
import json, sys, torch
from mla_registry import data, model_refs
from mla_registry import whisper
clips, limit, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
utts = data.load(clips, limit=limit, quiet=True)
out = {}
for path in sys.argv[4:]:
    model, processor = model_refs.load(path)
    feats = whisper.input_features(processor, [u.audio for u in utts])
    with torch.no_grad():
        out[path] = model.generate(feats, max_new_tokens=new).tolist()
print(json.dumps(out))
"""


@dataclass
class CaseResult:
    name: str
    spec: str
    cache_agrees: bool
    reload_agrees: bool
    tokens: int
    text: str

    @property
    def ok(self) -> bool:
        return self.cache_agrees and self.reload_agrees


def run(clips: int = 2, quiet: bool = True) -> tuple[list[CaseResult], dict]:
    """Run every case; returns the results and a description of the environment."""
    from . import checkpoint, data, model_refs, whisper
    from .calibration import CalibrationSettings
    from .convert import convert_model

    t0 = time.perf_counter()
    utts = data.load(CLIPS, limit=clips, quiet=quiet)
    results: list[CaseResult] = []
    expected: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="mla-registry-selftest-") as tmp:
        paths = {}
        for name, spec in CASES.items():
            model, processor = model_refs.load("bundled:whisper-tiny.en")
            convert_model(model, processor, [spec], CalibrationSettings(CALIBRATION, 4), quiet=quiet)
            feats = whisper.input_features(processor, [u.audio for u in utts])
            with torch.no_grad():
                cached = model.generate(feats, max_new_tokens=MAX_NEW_TOKENS)
                uncached = model.generate(feats, max_new_tokens=MAX_NEW_TOKENS, use_cache=False)
            paths[name] = str(Path(tmp) / name)
            checkpoint.save(model, paths[name], processor)
            expected[paths[name]] = cached.tolist()
            text = processor.tokenizer.decode(cached[0], skip_special_tokens=True).strip()
            results.append(CaseResult(name, spec, torch.equal(cached, uncached), False, cached.shape[1], text))
        proc = subprocess.run([sys.executable, "-c", _FRESH, CLIPS, str(clips), str(MAX_NEW_TOKENS), *paths.values()],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"the fresh-process reload failed:\n{proc.stderr[-4000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        for r in results:
            r.reload_agrees = got[paths[r.name]] == expected[paths[r.name]]
    env = {"mla_registry": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
           "python": sys.version.split()[0], "seconds": round(time.perf_counter() - t0, 1)}
    try:
        import torchcodec

        env["torchcodec"] = torchcodec.__version__
    except ImportError:  # pragma: no cover - a dependency
        env["torchcodec"] = "not installed"
    return results, env
