"""``--to transformers``: a stock ``WhisperForConditionalGeneration`` directory that plain transformers loads
with no mla-registry installed. Every converted slot is re-expressed as stock attention by its plugin's
``to_stock()`` (MLA re-expanded, GQA heads repeated, ``mha`` as is); the cache saving is lost."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import WhisperForConditionalGeneration
from transformers.initialization import no_init_weights

from .. import lineage, model_refs, whisper
from ..atomic import atomic_dir, write_json
from ..errors import ExportError
from ..registry import get_builder

CACHE_NOTE = ("stock attention: the cache holds full K/V again (2 * d_model values per token per layer, self and "
              "cross); the plugin's cache saving is not kept in this format (--to onnx keeps it)")


def stock_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every converted slot's weights replaced by its plugin's stock form."""
    slots = {s.path: s for s in whisper.slots(model)}
    state = dict(model.state_dict())
    for rec in lineage.of(model).slots:
        builder = get_builder(rec.plugin, package_hint=rec.package.split(" ")[0] or None)
        stock = builder.to_stock(model.get_submodule(rec.path), slots[rec.path])
        prefix = rec.path + "."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state.update({prefix + k: v for k, v in stock.items()})
    return state


def stock_model(model: nn.Module) -> WhisperForConditionalGeneration:
    """A stock Whisper with ``model``'s weights (converted slots re-expressed); refuses a plugin without a
    stock form (:meth:`~mla_registry.builder.AttentionBuilder.to_stock`) or one whose form does not fit."""
    state = stock_state(model)
    with no_init_weights():
        stock = WhisperForConditionalGeneration(copy.deepcopy(model.config))
    tied = set(getattr(stock, "_tied_weights_keys", None) or {})
    try:
        result = stock.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ExportError(f"a plugin's to_stock() returned weights of the wrong shape: {exc}") from None
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ExportError(f"a plugin's to_stock() does not give stock attention; missing: {missing[:6]}, "
                          f"unexpected: {result.unexpected_keys[:6]}")
    stock.tie_weights()
    stock.generation_config = copy.deepcopy(model.generation_config)
    return stock.eval()


def write_stock(stock: WhisperForConditionalGeneration, processor, out: Path) -> None:
    """Save a stock model (config, generation config, safetensors, processor files) at ``out`` (not atomic:
    callers write into a temporary directory)."""
    stock.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def load_stock(ckpt: Path) -> tuple[WhisperForConditionalGeneration, Any]:
    """The stock model of checkpoint ``ckpt`` and its processor; a plugin without a stock form refuses before
    anything else is read."""
    stock = stock_model(model_refs.load_model(str(ckpt)))
    return stock, model_refs.load_processor(str(ckpt))


def export_transformers(ckpt: Path, out: Path) -> dict[str, Any]:
    """Write the stock directory and its provenance to ``out`` atomically."""
    from .core import PROVENANCE, provenance

    stock, processor = load_stock(ckpt)
    info = provenance(ckpt, "transformers", {"cache": CACHE_NOTE})
    with atomic_dir(out) as tmp:
        write_stock(stock, processor, tmp)
        write_json(tmp / PROVENANCE, info)
    return info
