"""Fingerprints: sha256 of what makes two things the same (weights, configurations). One implementation for the
encoder-output sharing, fine-tuning resume and experiment resume."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


def of_tensors(state: nn.Module | Mapping[str, torch.Tensor], h: Any = None) -> str:
    """sha256 over names, dtypes, shapes and bytes of a module's state dict (or of a mapping of tensors):
    equal only for identical weights."""
    h = h or hashlib.sha256()
    items = state.state_dict().items() if isinstance(state, nn.Module) else state.items()
    for name, t in items:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def of_json(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys; non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def of_file(path: Path) -> str | None:
    """sha256 of a file's bytes, read in 1 MiB blocks (None when there is no such file)."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
