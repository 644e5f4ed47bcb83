"""What to fine-tune, on what, and how: one dataclass, the ``finetune:`` block of experiments.yaml and the
options of ``mla-registry finetune`` alike (:mod:`mla_registry.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import at_least, check, from_mapping, problems, setting
from ..errors import KwargError

OBJECTIVES = ("ce", "distill", "ce+distill")
TRAINABLE = ("converted", "kv", "attention", "decoder", "all")
DECAYS = ("cosine", "linear", "constant")


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _not_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


@dataclass
class FinetuneConfig:
    """Recovery fine-tuning settings.

    trainable: ``converted`` (every parameter of the converted attention modules), ``kv`` (the "kv" parameter
    group each converted slot's plugin declares: the factorised or pooled key/value projections), ``attention``
    (every decoder attention module, plus converted slots), ``decoder`` (the whole decoder, plus converted
    slots), ``all``. Parameters the model itself keeps frozen (Whisper's sinusoidal encoder positions) stay frozen.
    """

    train: str = setting(help="training data reference (default: the experiment's data.train)", check=_not_empty,
                         cli=False)
    valid: str = setting(help="validation data reference (default: data.valid): early stopping, best weights",
                         check=_not_empty, cli=False)
    objective: str = setting("distill", "ce: cross-entropy on transcripts; distill: KL to the teacher's "
                             "teacher-forced logits; ce+distill: their sum", choices=OBJECTIVES)
    distill_weight: float = setting(1.0, "weight of the KL in ce+distill (ce weight 1)", check=at_least(0))
    trainable: str = setting("converted", "converted | kv | attention | decoder | all (see the class docs)",
                             choices=TRAINABLE)
    steps: int = setting(200, "optimiser steps", check=at_least(1))
    batch_size: int = setting(8, "utterances per step", check=at_least(1))
    lr: float = setting(1e-4, "peak learning rate (AdamW)", check=_positive)
    warmup_steps: int = setting(20, "linear warm-up from lr/warmup_steps to lr", check=at_least(0))
    weight_decay: float = setting(0.0, "AdamW weight decay", check=at_least(0))
    eval_every: int = setting(25, "validation loss every N steps (and at step 0 and at the end)", check=at_least(1))
    patience: int = setting(4, "stop after N validations without improvement (0: never stop early)",
                            check=at_least(0))
    max_grad_norm: float = setting(1.0, "gradient clipping (0: none)", check=at_least(0))
    seed: int = setting(0, "data order and initialisation seed", check=at_least(0))
    train_limit: int | None = setting(None, "only the first N training utterances", check=at_least(1))
    valid_limit: int | None = setting(None, "only the first N validation utterances", check=at_least(1))
    temperature: float = setting(1.0, "distillation temperature (the KL is scaled by T^2)", check=_positive)
    distill_topk: int = setting(64, "teacher log-probabilities kept per token (+ one bucket for the rest)",
                                check=at_least(1))
    decay: str = setting("cosine", "after warm-up: cosine | linear (to 0 at steps) | constant", choices=DECAYS)

    def __post_init__(self) -> None:
        check(self)

    @property
    def uses_ce(self) -> bool:
        return self.objective in ("ce", "ce+distill")

    @property
    def uses_distill(self) -> bool:
        return self.objective in ("distill", "ce+distill")

    @classmethod
    def from_mapping(cls, block: Mapping[str, Any] | None, defaults: Mapping[str, Any] | None = None
                     ) -> FinetuneConfig:
        """A config from a YAML mapping; ``defaults`` is the experiment's ``data:`` mapping (train/valid refs).
        Unknown keys, wrong types and bad values raise :class:`KwargError` naming every key at fault."""
        if block is not None and not isinstance(block, Mapping):
            raise KwargError(f"finetune must be a mapping of options, got {type(block).__name__}")
        values = dict(block or {})
        found = []
        for key in ("train", "valid"):
            if key not in values and (defaults or {}).get(key):
                values[key] = defaults[key]
            elif key not in values:
                found.append(f"finetune.{key}: is missing: set data.{key} (shared by every variant) or "
                             f"finetune.{key} to a dataset reference, e.g. builtin:tts-{key}")
        found += [f"finetune.{k}: {m}" for k, m in problems(cls, values)]
        if found:
            raise KwargError("; ".join(found))
        return from_mapping(cls, values, where="finetune")
