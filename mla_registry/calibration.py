"""Calibration: the real inputs each attention module sees on real audio, for activation-aware conversion.

One teacher-forced pass of the *original* model over the calibration utterances (audio + reference transcript)
records, through forward pre-hooks, what enters every attention module: its key/value inputs (the hidden states
for self-attention, the encoder output for cross-attention) and its query inputs (the hidden states; for
cross-attention the decoder's). Padding positions of the decoder are dropped.

Calibration is a setting of the conversion, not of a plugin: one reference and one size
(:class:`CalibrationSettings`), the same utterances for every plugin that asks, recorded in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import whisper
from .builder import Slot
from .errors import DataError

DEFAULT_CALIBRATION = "builtin:tts-train"
DEFAULT_CALIBRATION_SIZE = 64


@dataclass(frozen=True)
class CalibrationSettings:
    """Which audio calibrates a conversion: a dataset reference and how many of its utterances."""

    data: str = DEFAULT_CALIBRATION
    size: int = DEFAULT_CALIBRATION_SIZE


class CalibrationContext:
    """A :class:`mla_registry.builder.ConversionContext` backed by a model, its processor and a dataset. The
    capture runs on first use only: conversions that need no calibration load no audio."""

    def __init__(self, model: nn.Module, processor, settings: CalibrationSettings = CalibrationSettings(),
                 batch_size: int = 8, quiet: bool = True):
        self.model = model
        self.processor = processor
        self.settings = settings
        self.batch_size = batch_size
        self.quiet = quiet
        self._kv: dict[str, torch.Tensor] | None = None
        self._query: dict[str, torch.Tensor] | None = None
        self.used: dict | None = None  # provenance of the data, once it was used

    def calibration_inputs(self, slot: Slot) -> torch.Tensor:
        if self._kv is None:
            self._capture()
        return self._kv[slot.path]

    def query_inputs(self, slot: Slot) -> torch.Tensor:
        if self._query is None:
            self._capture()
        return self._query[slot.path]

    def original(self, slot: Slot) -> nn.Module:
        return self.model.get_submodule(slot.path)

    @torch.no_grad()
    def _capture(self) -> None:
        from . import data as datasets

        ref, size = self.settings.data, self.settings.size
        utts = datasets.load(ref, limit=size, quiet=self.quiet)
        if len(utts) < size:
            raise DataError(f"calibration data '{ref}' has {len(utts)} utterances; calibration_size asks for {size}"
                            " (lower calibration_size, or use a larger set)")
        self.used = {"ref": ref, "size": len(utts), "fingerprint": datasets.fingerprint_of(utts),
                     **{k: v for k, v in datasets.describe(ref).items() if k in ("kind", "seed", "version")}}
        paths = {s.path: s for s in whisper.slots(self.model)}
        kv: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        query: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        state: dict[str, torch.Tensor | None] = {"mask": None}

        def rows(x: torch.Tensor, decoder: bool) -> torch.Tensor:
            x = x[state["mask"]] if decoder else x
            return x.reshape(-1, x.shape[-1]).float().cpu()

        def hook(path: str):
            slot = paths[path]

            def pre(_module, args, kwargs):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                decoder = slot.kind.startswith("decoder")
                query[path].append(rows(hidden, decoder))
                if slot.is_cross and slot.layer == 0:  # every cross slot sees the same encoder output: one copy
                    kv[path].append(rows(kwargs.get("key_value_states", args[1] if len(args) > 1 else None), False))
                # self-attention: the K/V inputs are the query inputs (the same tensor, stored once)
            return pre

        handles = [self.model.get_submodule(p).register_forward_pre_hook(hook(p), with_kwargs=True) for p in paths]
        param = next(self.model.parameters())
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(utts), self.batch_size):
                batch = utts[i: i + self.batch_size]
                feats = whisper.input_features(self.processor, [u.audio for u in batch], param.device, param.dtype)
                ids, labels, _ = whisper.teacher_forcing(self.model, self.processor.tokenizer,
                                                         [u.text for u in batch], param.device)
                # keep every real decoder position (prompt included), drop the padding after each transcript
                mask = labels != -100
                mask[:, : len(whisper.prompt_ids(self.model)) - 1] = True
                state["mask"] = mask
                self.model(input_features=feats, decoder_input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        self._query = {p: torch.cat(xs) for p, xs in query.items() if xs}
        cross = next((torch.cat(kv[p]) for p, s in paths.items() if s.is_cross and kv[p]), None)
        self._kv = {p: (cross if s.is_cross else self._query[p]) for p, s in paths.items() if p in self._query}
