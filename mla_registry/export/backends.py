"""Exported models as evaluation backends: ``mla-registry evaluate --model DIR --backend onnxruntime`` (an
``--to onnx`` export, run by :class:`~mla_registry.export.ort.OrtWhisper`) or ``--backend ctranslate2`` (an
``--to ctranslate2`` export, run by CTranslate2's ``Whisper.generate``). Each transcribes the same batches with
the same features and greedy decoding as :func:`mla_registry.evaluate.transcribe`, so WERs compare."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import whisper
from ..errors import ExportError, KwargError
from ..process_memory import peak_rss_bytes

BACKENDS = ("pytorch", "onnxruntime", "ctranslate2")


def _check(settings, utts, backend: str) -> None:
    if settings.num_beams != 1:
        raise KwargError(f"--backend {backend}: decodes greedily; --num-beams must be 1 (got {settings.num_beams})")
    if settings.language not in (None, "en") or settings.task != "transcribe":
        raise KwargError(f"--backend {backend}: transcribes with the export's own prompt (English, transcribe)")
    from ..evaluate import fits_window

    long = [u.id for u in utts if not fits_window(u)]
    if long:
        raise ExportError(f"--backend {backend}: {len(long)} utterance(s) are longer than Whisper's 30-second "
                          f"window ({', '.join(long[:3])}); long-form decoding runs only with --backend pytorch")


def generated_ids(ids: list[int], prompt_len: int, eos: set[int]) -> tuple[list[int], int]:
    """Generated ids without the prompt and from the first end-of-text on; the count up to and including it."""
    gen = ids[prompt_len:]
    for j, t in enumerate(gen):
        if t in eos:
            return gen[:j], j + 1
    return gen, len(gen)


class ExportedBackend:
    """What :func:`mla_registry.evaluate.evaluate` needs of a model that is not a PyTorch module."""

    name = ""
    dir: Path

    def processor(self):
        """The processor files the export carries (feature extractor and tokenizer)."""
        from transformers import WhisperProcessor

        try:
            return WhisperProcessor.from_pretrained(self.dir)
        except OSError as exc:
            raise ExportError(f"{self.dir}: no processor files ({exc})") from None

    def transcribe(self, processor, utts, settings, quiet: bool = False) -> tuple[list[str], dict[str, Any]]:
        _check(settings, utts, self.name)
        hyps: list[str] = []
        stats: dict[str, Any] = {"encoder_seconds": 0.0, "decode_seconds": 0.0, "generated_tokens": 0,
                                 "long_form_utterances": 0, "audio_seconds": 0.0}
        self.token_ids: list[list[int]] = []
        bar = tqdm(total=len(utts), desc=f"transcribing ({self.name})", disable=quiet, unit="utt")
        for start in range(0, len(utts), settings.batch_size):
            batch = [utts[i] for i in range(start, min(start + settings.batch_size, len(utts)))]
            stats["audio_seconds"] += sum(u.duration for u in batch)
            feats = whisper.input_features(processor, [u.audio for u in batch]).numpy()
            rows, enc_s, dec_s = self.generate(feats, settings.max_new_tokens)
            stats["encoder_seconds"] += enc_s
            stats["decode_seconds"] += dec_s
            for row in rows:
                ids, counted = generated_ids(row, self.prompt_len, self.eos)
                self.token_ids.append(ids)
                stats["generated_tokens"] += counted
                hyps.append(processor.tokenizer.decode(ids, skip_special_tokens=True).strip())
            bar.update(len(batch))
        bar.close()
        stats.update(self.cache_stats())
        from ..evaluate import speed

        stats.update(speed(stats))
        stats["peak_rss_bytes"] = peak_rss_bytes()
        return hyps, stats


class OnnxRuntimeBackend(ExportedBackend):
    name = "onnxruntime"

    def __init__(self, export_dir: str | Path, device: str = "cpu") -> None:
        from .ort import OrtWhisper

        self.runtime = OrtWhisper(export_dir, device=device)
        self.dir = Path(export_dir)
        self.prompt_len = len(self.runtime.info["prompt"])
        self.eos = set(self.runtime.info["eos_token_id"])
        self.held: list = []

    def generate(self, feats: np.ndarray, max_new_tokens: int):
        t0 = time.perf_counter()
        hidden = self.runtime.encode(feats)
        t1 = time.perf_counter()
        rows = self.runtime.generate(hidden, max_new_tokens)
        self.held.append((len(rows), self.runtime.last_cache))
        return rows, t1 - t0, time.perf_counter() - t1

    def cache_stats(self) -> dict[str, Any]:
        """The cache tensors' real sizes, averaged over samples (what evaluation reports as kv_*)."""
        n = max(sum(k for k, _ in self.held), 1)
        return {"kv_self_bytes_per_token": sum(k * c.self_per_token for k, c in self.held) / n,
                "kv_cross_bytes_per_utterance": sum(k * c.cross_per_utterance for k, c in self.held) / n,
                "kv_cross_bytes_per_frame": sum(k * c.cross_per_frame for k, c in self.held) / n,
                "cache_shapes": self.held[-1][1].shapes if self.held else {}}

    def describe(self) -> dict[str, Any]:
        return self.runtime.describe()


class CTranslate2Backend(ExportedBackend):
    name = "ctranslate2"

    def __init__(self, export_dir: str | Path, device: str = "cpu") -> None:
        from transformers import GenerationConfig

        from .ct2 import _ctranslate2

        self.ct2 = _ctranslate2()
        self.dir = Path(export_dir)
        if not (self.dir / "model.bin").is_file():
            raise ExportError(f"{self.dir}: not a CTranslate2 model (no model.bin); write one with "
                              "mla-registry export CKPT --to ctranslate2 --out DIR")
        self.model = self.ct2.models.Whisper(str(self.dir), device="cuda" if device.startswith("cuda") else "cpu")
        gen = GenerationConfig.from_pretrained(self.dir)
        self.prompt = [gen.decoder_start_token_id, gen.no_timestamps_token_id]
        self.prompt_len = len(self.prompt)
        eos = gen.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def generate(self, feats: np.ndarray, max_new_tokens: int):
        t0 = time.perf_counter()
        encoded = self.model.encode(self.ct2.StorageView.from_array(np.ascontiguousarray(feats)))
        t1 = time.perf_counter()
        # max_length counts the prompt; CTranslate2 returns the generated ids without prompt or end-of-text
        res = self.model.generate(encoded, [self.prompt] * feats.shape[0], beam_size=1,
                                  max_length=max_new_tokens + self.prompt_len)
        eos = min(self.eos)
        rows = [self.prompt + r.sequences_ids[0] + ([eos] if len(r.sequences_ids[0]) < max_new_tokens else [])
                for r in res]
        return rows, t1 - t0, time.perf_counter() - t1

    def cache_stats(self) -> dict[str, Any]:
        return {}  # CTranslate2 does not expose its cache; it holds stock K/V (see the export's provenance)

    def describe(self) -> dict[str, Any]:
        return {"backend": "ctranslate2", "ctranslate2": self.ct2.__version__, "export": str(self.dir)}


def load_backend(name: str, export_dir: str, device: str = "cpu") -> ExportedBackend:
    """The backend ``name`` over the export in ``export_dir``."""
    if name == "onnxruntime":
        return OnnxRuntimeBackend(export_dir, device)
    if name == "ctranslate2":
        return CTranslate2Backend(export_dir, device)
    raise ExportError(f"--backend {name!r}: allowed: {', '.join(BACKENDS)}")
