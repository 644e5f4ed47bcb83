"""Calibration: the real inputs each attention module sees on real audio, for activation-aware conversion.

One teacher-forced pass of the *original* model over the calibration utterances (audio + reference transcript)
records, through forward pre-hooks, what enters every attention module's key/value projections: the hidden
states for self-attention, the encoder output for cross-attention. Padding tokens of the decoder are dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from .builder import Slot
from .families import whisper


class CalibrationContext:
    """A :class:`mla_registry.builder.ConversionContext` backed by a model, its processor and datasets."""

    def __init__(self, model: nn.Module, processor, batch_size: int = 8, quiet: bool = True):
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.quiet = quiet
        self._inputs: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self.used: dict[str, dict] = {}  # data ref -> provenance (recorded in the checkpoint)

    def calibration_inputs(self, slot: Slot, data: str, size: int) -> torch.Tensor:
        key = (data, int(size))
        if key not in self._inputs:
            self._inputs[key] = self._capture(data, int(size))
        return self._inputs[key][slot.path]

    @torch.no_grad()
    def _capture(self, data: str, size: int) -> dict[str, torch.Tensor]:
        from . import data as datasets

        utts = datasets.load(data, limit=size, quiet=self.quiet)
        self.used[data] = {"ref": data, "size": len(utts), **datasets.describe(data)}
        paths = {s.path: s for s in whisper.slots(self.model)}
        chunks: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        state: dict[str, torch.Tensor | None] = {"mask": None}

        def hook(path: str):
            slot = paths[path]

            def pre(_module, args, kwargs):
                x = kwargs.get("key_value_states") if slot.is_cross else kwargs.get("hidden_states")
                if x is None:
                    x = args[0]
                if slot.is_cross and slot.layer > 0:
                    return  # every cross-attention slot sees the same encoder output: keep one copy
                if slot.kind == "decoder.self":
                    x = x[state["mask"]]
                chunks[path].append(x.reshape(-1, x.shape[-1]).float().cpu())
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
        out = {p: torch.cat(xs) for p, xs in chunks.items() if xs}
        cross = next((out[p] for p, s in paths.items() if s.is_cross and p in out), None)
        for p, s in paths.items():
            if s.is_cross:
                out[p] = cross
        return out
