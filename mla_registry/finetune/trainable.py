"""Which parameters a fine-tuning run trains (``FinetuneConfig.trainable``)."""

from __future__ import annotations

from torch import nn

from .. import lineage, whisper
from ..errors import KwargError
from ..registry import get_builder
from .config import TRAINABLE


def _kv_prefixes(model: nn.Module) -> list[str]:
    """Full parameter-name prefixes of the "kv" group every converted slot's plugin declares."""
    out = []
    for rec in lineage.of(model).slots:
        groups = get_builder(rec.plugin).parameter_groups
        if "kv" not in groups:
            raise KwargError(f"finetune key 'trainable'='kv': plugin '{rec.plugin}' (slot {rec.slot}) declares no "
                             "'kv' parameter group; use trainable='converted', or declare parameter_groups in "
                             "the plugin's builder")
        out += [f"{rec.path}.{prefix}" for prefix in groups["kv"]]
    return out


def trainable_parameters(model: nn.Module, mode: str) -> dict[str, nn.Parameter]:
    """The parameters ``mode`` trains, by name (see :class:`FinetuneConfig`), in ``named_parameters`` order.
    Parameters that already have ``requires_grad=False`` are never selected."""
    if mode not in TRAINABLE:
        raise KwargError(f"finetune key 'trainable'={mode!r}: allowed values: {', '.join(TRAINABLE)}")
    converted = tuple(r.path + "." for r in lineage.of(model).slots)
    kv = tuple(_kv_prefixes(model)) if mode == "kv" else ()
    decoder_attn = tuple(s.path + "." for s in whisper.slots(model) if s.kind.startswith("decoder"))
    decoder_ids = {id(p) for p in model.get_decoder().parameters()}

    def chosen(name: str, p: nn.Parameter) -> bool:
        in_converted = bool(converted) and name.startswith(converted)
        if mode == "converted":
            return in_converted
        if mode == "kv":
            return bool(kv) and name.startswith(kv)
        if mode == "attention":
            return in_converted or name.startswith(decoder_attn)
        if mode == "decoder":
            return in_converted or id(p) in decoder_ids
        return True

    return {n: p for n, p in model.named_parameters() if p.requires_grad and chosen(n, p)}
