"""``--to onnx``: encoder, cross-cache and decoder-step graphs traced with ``torch.onnx.export`` (TorchScript
exporter: it traces the plugins' Python cache handling into plain tensor ops, no onnxscript needed), plus the
processor files, a ``graphs.json`` describing the cache tensors, and the provenance. Run by
:class:`mla_registry.export.ort.OrtWhisper`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import kvcache, model_refs
from ..atomic import atomic_dir, write_json
from ..errors import InstallError
from .graphs import CacheLayout, CrossCacheGraph, DecoderStepGraph, EncoderGraph, learn_layout

GRAPHS = "graphs.json"
OPSET = 17  # LayerNormalization is an ONNX op from 17; onnxruntime 1.20+ runs it


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise InstallError("--to onnx needs the onnx package: pip install 'mla-registry[onnx]'") from None


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, str]]) -> None:
    with warnings.catch_warnings():
        # the tracer warns about every Python int it freezes (head counts, widths): those are constants here
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def write_onnx(model: torch.nn.Module, processor, out: Path) -> dict[str, Any]:
    """Trace the three graphs of ``model`` (float32, CPU) into ``out``; returns what ``graphs.json`` says.
    ``model`` is left in the mode it came in: ``torch.onnx.export`` restores the *wrapper's* mode after tracing,
    and a wrapper built in training mode would switch the whole model to training (MLA then re-expands K/V
    every step: 16x slower decoding, measured)."""
    _require_onnx()
    was_training = model.training
    try:
        return _write_onnx(model.float().cpu().eval(), processor, out)
    finally:
        model.train(was_training)


def _write_onnx(model: torch.nn.Module, processor, out: Path) -> dict[str, Any]:
    cfg = model.config
    feats = torch.zeros(2, cfg.num_mel_bins, 2 * cfg.max_source_positions)
    with torch.no_grad():
        hidden = model.get_encoder()(feats).last_hidden_state
        layout = learn_layout(model, hidden, model.generation_config.decoder_start_token_id)
        cross = CrossCacheGraph(model, layout).eval()
        cross_tensors = cross(hidden)
        _export(EncoderGraph(model).eval(), (feats,), out / "encoder.onnx", ["input_features"],
                ["encoder_hidden_states"],
                {"input_features": {0: "batch"}, "encoder_hidden_states": {0: "batch"}})
        cross_names = layout.names("cross")
        _export(cross, (hidden,), out / "cross_cache.onnx", ["encoder_hidden_states"], cross_names,
                {"encoder_hidden_states": {0: "batch"}, **{n: {0: "batch"} for n in cross_names}})
        # traced with three cached tokens: the cache length is a dynamic axis, so any length runs (0 included)
        self_in = [torch.zeros(2, e.heads, 3, e.width) for e in layout.entries("self")]
        self_names = layout.names("self")
        ids, pos = torch.full((2, 1), model.generation_config.decoder_start_token_id), torch.tensor([3])
        step = DecoderStepGraph(model, layout).eval()
        dynamic = {"input_ids": {0: "batch"}, "logits": {0: "batch"},
                   **{f"past.{n}": {0: "batch", 2: "past"} for n in self_names},
                   **{f"present.{n}": {0: "batch", 2: "tokens"} for n in self_names},
                   **{n: {0: "batch"} for n in cross_names}}
        _export(step, (ids, pos, *self_in, *cross_tensors), out / "decoder.onnx",
                ["input_ids", "position", *(f"past.{n}" for n in self_names), *cross_names],
                ["logits", *(f"present.{n}" for n in self_names)], dynamic)
    self_b, cross_b = kvcache.declared(model)
    info = {"opset": OPSET, "dtype": "float32", "layout": layout.to_json(),
            "prompt": model_refs_prompt(model), "eos_token_id": _eos(model),
            "suppress_tokens": list(model.generation_config.suppress_tokens or []),
            "begin_suppress_tokens": list(model.generation_config.begin_suppress_tokens or []),
            "max_target_positions": cfg.max_target_positions,
            "declared_bytes": {"self_per_token": self_b, "cross_per_frame": cross_b},
            "graph_bytes": {"self_per_token": 4 * layout.values_per_token("self"),
                            "cross_per_frame": 4 * layout.values_per_token("cross")}}
    write_json(out / GRAPHS, info)
    processor.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return info


def model_refs_prompt(model) -> list[int]:
    from .. import whisper

    return whisper.prompt_ids(model)


def _eos(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, list) else [eos]


def read_graphs(export_dir: str | Path) -> dict[str, Any]:
    """``graphs.json`` of an ONNX export, its layout parsed."""
    info = json.loads((Path(export_dir) / GRAPHS).read_text(encoding="utf-8"))
    info["layout"] = CacheLayout.from_json(info["layout"])
    return info


def export_onnx(ckpt: Path, out: Path, quiet: bool = True) -> dict[str, Any]:
    """Write the ONNX export of checkpoint ``ckpt`` and its provenance to ``out`` atomically."""
    from .core import PROVENANCE, provenance

    _require_onnx()
    model, processor = model_refs.load(str(ckpt))
    with atomic_dir(out) as tmp:
        graphs = write_onnx(model, processor, tmp)
        info = provenance(ckpt, "onnx", {
            "cache": "the plugin's own cache: graph inputs/outputs hold exactly what its modules cache "
                     f"({graphs['graph_bytes']['self_per_token']} B per token self-attention, "
                     f"{graphs['graph_bytes']['cross_per_frame']} B per encoder frame cross-attention)",
            "graphs": ["encoder.onnx", "cross_cache.onnx", "decoder.onnx"], "opset": OPSET})
        write_json(tmp / PROVENANCE, info)
    return info
