"""Calibration: the real inputs each attention module sees on real audio, for activation-aware conversion.

One teacher-forced pass of the *original* model over the calibration utterances (audio + reference transcript)
records, through forward pre-hooks, what enters every attention module: its key/value inputs (the hidden states
for self-attention, the encoder output for cross-attention) and its query inputs (the hidden states; for
cross-attention the decoder's). Padding positions of the decoder are dropped.

Calibration is a setting of the conversion, not of a plugin: one reference and one size
(:class:`CalibrationSettings`), the same utterances for every plugin that asks, recorded in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from . import fingerprint, whisper
from .builder import Slot
from .encoder_cache import EncoderOutputs, encoder_fingerprint, set_batches
from .errors import DataError

DEFAULT_CALIBRATION = "builtin:tts-train"
DEFAULT_CALIBRATION_SIZE = 64


@dataclass(frozen=True)
class CalibrationSettings:
    """Which audio calibrates a conversion: a dataset reference and how many of its utterances."""

    data: str = DEFAULT_CALIBRATION
    size: int = DEFAULT_CALIBRATION_SIZE


class CapturedInputs:
    """Calibration inputs kept for the later conversions of the same weights with the same settings. An
    experiment's variants all convert one base model, and the capture (the encoder over every calibration
    utterance) is nearly all of an activation-aware conversion's time: about 20 of 21 s for tiny.en, 64
    utterances, 2 cores. Keyed by a hash of the weights, the settings, device and dtype; kept per slot path, so
    a conversion of fewer slots reuses a capture of more. Only the slots that were asked for are held (for a
    decoder conversion: the encoder output once, 147 MB for 64 tiny.en utterances, and the decoder states).
    Builders read these tensors and never write into them (:class:`~mla_registry.builder.ConversionContext`).

    With ``encoder_outputs`` (a run's), a capture of decoder slots takes the calibration audio's encoder outputs
    from there, in batches of ``outputs_batch_size``, and leaves them for the fine-tunes that train on the same
    dataset (:func:`~mla_registry.encoder_cache.set_batches`): 64 clips, ~15 s for tiny.en on 2 cores."""

    def __init__(self, encoder_outputs: EncoderOutputs | None = None, outputs_batch_size: int = 16) -> None:
        self._entries: dict[tuple, dict] = {}
        self.captures = 0  # passes over the calibration audio
        self.reuses = 0
        self.encoder_outputs = encoder_outputs
        self.outputs_batch_size = outputs_batch_size

    def get(self, key: tuple, paths: set[str]) -> dict | None:
        entry = self._entries.get(key)
        if entry is None or not paths <= entry["query"].keys():
            return None
        self.reuses += 1
        return entry

    def put(self, key: tuple, kv: dict, query: dict, used: dict) -> None:
        """Keep a new capture (merged with earlier ones of the same key)."""
        self.captures += 1
        entry = self._entries.setdefault(key, {"kv": {}, "query": {}, "used": used})
        entry["kv"].update(kv)
        entry["query"].update(query)


class CalibrationContext:
    """A :class:`mla_registry.builder.ConversionContext` backed by a model, its processor and a dataset. The
    capture runs on first use only: conversions that need no calibration load no audio. It records the inputs
    of ``paths`` (the slots being converted; every slot when None), and with ``shared`` reuses an earlier capture
    of the same weights and settings."""

    def __init__(self, model: nn.Module, processor, settings: CalibrationSettings = CalibrationSettings(),
                 batch_size: int = 8, quiet: bool = True, paths: Iterable[str] | None = None,
                 shared: CapturedInputs | None = None):
        self.model = model
        self.processor = processor
        self.settings = settings
        self.batch_size = batch_size
        self.quiet = quiet
        self.paths = set(paths) if paths is not None else None
        self.shared = shared
        self._kv: dict[str, torch.Tensor] = {}
        self._query: dict[str, torch.Tensor] = {}
        self.used: dict | None = None  # provenance of the data, once it was used

    def calibration_inputs(self, slot: Slot) -> torch.Tensor:
        return self._inputs(slot)[0]

    def query_inputs(self, slot: Slot) -> torch.Tensor:
        return self._inputs(slot)[1]

    def original(self, slot: Slot) -> nn.Module:
        return self.model.get_submodule(slot.path)

    def _inputs(self, slot: Slot) -> tuple[torch.Tensor, torch.Tensor]:
        if slot.path not in self._query:
            want = (self.paths if self.paths is not None else {s.path for s in whisper.slots(self.model)})
            self._capture(want | {slot.path})
        return self._kv[slot.path], self._query[slot.path]

    def _capture(self, want: set[str]) -> None:
        param = next(self.model.parameters())
        key = (fingerprint.of_tensors(self.model), self.settings.data, self.settings.size, self.batch_size,
               str(param.device), str(param.dtype)) if self.shared is not None else None
        entry = self.shared.get(key, want) if self.shared is not None else None
        if entry is None:
            kv, query, used = self._record(want)
            if self.shared is not None:
                self.shared.put(key, kv, query, used)
        else:
            kv, query, used = entry["kv"], entry["query"], entry["used"]
        self._kv.update({p: kv[p] for p in want})
        self._query.update({p: query[p] for p in want})
        self.used = dict(used)

    @torch.no_grad()
    def _record(self, want: set[str]) -> tuple[dict, dict, dict]:
        """One teacher-forced pass of the original model over the calibration audio, hooked at ``want``."""
        from . import data as datasets

        ref, size = self.settings.data, self.settings.size
        utts = datasets.load(ref, limit=size, quiet=self.quiet)
        if len(utts) < size:
            raise DataError(f"calibration data '{ref}' has {len(utts)} utterances; calibration_size asks for {size}"
                            " (lower calibration_size, or use a larger set)")
        used = {"ref": ref, "size": len(utts), "fingerprint": datasets.fingerprint_of(utts),
                **{k: v for k, v in datasets.describe(ref).items() if k in ("kind", "seed", "version")}}
        paths = {s.path: s for s in whisper.slots(self.model) if s.path in want}
        # every cross slot sees the same encoder output: one copy, taken at the first cross slot hooked
        first_cross = next((p for p, s in paths.items() if s.is_cross), None)
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
                if path == first_cross:
                    kv[path].append(rows(kwargs.get("key_value_states", args[1] if len(args) > 1 else None), False))
                # self-attention: the K/V inputs are the query inputs (the same tensor, stored once)
            return pre

        handles = [self.model.get_submodule(p).register_forward_pre_hook(hook(p), with_kwargs=True) for p in paths]
        param = next(self.model.parameters())
        was_training = self.model.training
        self.model.eval()
        # the run's encoder outputs serve a capture of decoder slots only (encoder slots' hooks need the encoder)
        outputs = self.shared.encoder_outputs if self.shared is not None else None
        encoded = self._encoded(outputs, utts) if outputs is not None and all(
            s.kind.startswith("decoder") for s in paths.values()) else None
        try:
            for i in range(0, len(utts), self.batch_size):
                batch = utts[i: i + self.batch_size]
                ids, labels, _ = whisper.teacher_forcing(self.model, self.processor.tokenizer,
                                                         [u.text for u in batch], param.device)
                # keep every real decoder position (prompt included), drop the padding after each transcript
                mask = labels != -100
                mask[:, : len(whisper.prompt_ids(self.model)) - 1] = True
                state["mask"] = mask
                if encoded is not None:
                    hidden = torch.stack(encoded[i: i + self.batch_size]).to(param.device, param.dtype)
                    self.model.base_model(encoder_outputs=(hidden,), decoder_input_ids=ids, use_cache=False)
                else:
                    feats = whisper.input_features(self.processor, [u.audio for u in batch], param.device,
                                                   param.dtype)
                    self.model(input_features=feats, decoder_input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        queries = {p: torch.cat(xs) for p, xs in query.items() if xs}
        cross = torch.cat(kv[first_cross]) if first_cross is not None else None
        return {p: (cross if s.is_cross else queries[p]) for p, s in paths.items()}, queries, used

    def _encoded(self, outputs: EncoderOutputs, utts: list) -> list[torch.Tensor]:
        """Each utterance's encoder output, from the run's ``outputs`` (computed there when missing, in the
        batches a fine-tune on the same dataset looks up)."""
        out: list[torch.Tensor] = []
        for batch, key in set_batches(encoder_fingerprint(self.model), utts, self.shared.outputs_batch_size):
            def features(batch=batch) -> torch.Tensor:
                return whisper.input_features(self.processor, [u.audio for u in batch])

            hidden, _ = outputs.get(self.model, key, tuple(u.id for u in batch), features)
            out += list(hidden)
        return out
