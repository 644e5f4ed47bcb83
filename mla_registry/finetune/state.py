"""Resumable training state in ``work_dir/state`` (safetensors + JSON, no pickle), written atomically after
every validation: current and best trainable weights, AdamW moments, the torch RNG, the curve. A rerun with the
same configuration and the same starting model continues from the last validation; a finished run is not
repeated."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .. import fingerprint, lineage
from ..atomic import atomic_dir
from .config import FinetuneConfig

STATE_DIR = "state"
STATE_FORMAT = 1


def start_fingerprint(model: nn.Module, cfg: FinetuneConfig, params: dict[str, nn.Parameter]) -> str:
    """Identifies the starting point: the config, the converted slots, what trains, and every starting weight."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": asdict(cfg), "slots": [r.to_json() for r in lineage.of(model).slots],
                         "trainable": list(params)}, sort_keys=True, default=str).encode())
    return fingerprint.of_tensors(model, h)[:20]


def save_state(state_dir: Path, meta: dict[str, Any], current: dict[str, torch.Tensor],
               best: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor]) -> None:
    with atomic_dir(state_dir) as tmp:
        safetensors.torch.save_file(current, str(tmp / "params.safetensors"))
        safetensors.torch.save_file(best, str(tmp / "best.safetensors"))
        safetensors.torch.save_file(optimizer, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        safetensors.torch.save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_state(state_dir: Path, fp: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The saved state's metadata when it belongs to this configuration and starting model, else None."""
    path = state_dir / "state.json"
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log(f"fine-tune: ignoring unreadable training state {path} ({exc}); starting afresh")
        return None
    if meta.get("format") != STATE_FORMAT or meta.get("fingerprint") != fp:
        log(f"fine-tune: training state in {state_dir} belongs to another configuration or starting model; "
            "starting afresh")
        return None
    return meta


def load_tensors(state_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(state_dir / f"{name}.safetensors"))


def restore_rng(state_dir: Path) -> None:
    rng = load_tensors(state_dir, "rng")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])


def copy_into(params: dict[str, nn.Parameter], values: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone().contiguous() for n, p in params.items()}


def optimizer_tensors(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as named tensors (``NAME::exp_avg``, ...)."""
    state = opt.state_dict()["state"]
    out = {}
    for idx, name in enumerate(params):
        for key, value in state.get(idx, {}).items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{name}::{key}"] = t.detach().cpu().clone().contiguous()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                           tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for idx, name in enumerate(params):
        entries = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
        if entries:
            state[idx] = {k: (v if k == "step" else v.to(device)) for k, v in entries.items()}
    sd["state"] = state
    opt.load_state_dict(sd)
