"""The Whisper family adapter: names the attention slots of a Whisper model.

Slots are ``encoder.self.N``, ``decoder.self.N`` and ``decoder.cross.N``; each knows its module path and the
shape facts a builder needs.
"""

from __future__ import annotations

from torch import nn

from ..builder import Slot

FAMILY = "whisper"
KINDS = ("encoder.self", "decoder.self", "decoder.cross")


def _base(model: nn.Module) -> tuple[nn.Module, str]:
    """The ``WhisperModel`` inside ``model`` and its path prefix."""
    if hasattr(model, "model") and hasattr(model.model, "encoder"):
        return model.model, "model."
    if hasattr(model, "encoder") and hasattr(model, "decoder"):
        return model, ""
    raise TypeError(f"{type(model).__name__} is not a Whisper model (no encoder/decoder)")


def slots(model: nn.Module) -> list[Slot]:
    """Every attention slot of ``model``, in a stable order (encoder self, then per decoder layer self, cross)."""
    base, prefix = _base(model)
    config = model.config
    out: list[Slot] = []
    for i, layer in enumerate(base.encoder.layers):
        out.append(_slot(config, f"{prefix}encoder.layers.{i}.self_attn", "encoder.self", i, layer.self_attn,
                         heads=config.encoder_attention_heads, causal=False, cross=False, layer_idx=None))
    for i, layer in enumerate(base.decoder.layers):
        out.append(_slot(config, f"{prefix}decoder.layers.{i}.self_attn", "decoder.self", i, layer.self_attn,
                         heads=config.decoder_attention_heads, causal=True, cross=False, layer_idx=i))
        out.append(_slot(config, f"{prefix}decoder.layers.{i}.encoder_attn", "decoder.cross", i,
                         layer.encoder_attn, heads=config.decoder_attention_heads, causal=False, cross=True,
                         layer_idx=i))
    return out


def _slot(config, path, kind, i, module, *, heads, causal, cross, layer_idx) -> Slot:
    return Slot(
        path=path, kind=kind, layer=i, embed_dim=config.d_model, num_heads=heads, is_causal=causal,
        is_cross=cross, bias=True, dropout=float(config.attention_dropout), layer_idx=layer_idx, config=config,
    )
