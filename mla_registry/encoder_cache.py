"""Encoder outputs shared between the variants of a run, within a memory budget.

Comparing N decoder variants costs one encoder pass when their encoders are identical (recognised by a hash of
the encoder's weights, not by trust). Keeping every output in memory does not scale: 1500 frames x width x 4
bytes per utterance is ~0.8 GB for 361 utterances on tiny.en and ~20 GB for LibriSpeech test-clean on
large-v3. :class:`EncoderOutputs` keeps outputs in memory up to ``budget_bytes``; beyond it, a batch goes to a
safetensors file in ``spill_dir`` when writing and reading it back is cheaper than running the encoder again,
and is otherwise recomputed when asked for. The spill directory is removed at :meth:`close` unless ``keep``.
:meth:`report` says what happened (how many batches were held, spilled, recomputed, and the bytes).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from . import fingerprint, whisper
from .atomic import write_bytes

GiB = 1 << 30
DEFAULT_BUDGET = 2 * GiB


def encoder_fingerprint(model: nn.Module) -> str:
    """Equal only for identical encoders (names, dtypes, shapes and bytes of every encoder tensor)."""
    return fingerprint.of_tensors(model.get_encoder())


def set_batches(encoder: str, utts: list, batch_size: int) -> list[tuple[list, str]]:
    """``utts`` in batches of ``batch_size``, each with the key its encoder outputs are kept under in a run's
    :class:`EncoderOutputs` (beside the batch's ids): the encoder's fingerprint and the fingerprint (ids and
    transcripts, in order) of the utterances up to the batch's end. Lists that begin alike share their common
    leading batches: a validation set and a fine-tune's, the calibration utterances and a training set taken
    from the start of the same dataset. Apart from the test set's keys, since the same ids in two sets need not
    be the same audio."""
    from .data import fingerprint_of

    return [(utts[i: i + batch_size], f"{encoder}/set/{fingerprint_of(utts[: i + batch_size])[:16]}")
            for i in range(0, len(utts), batch_size)]


class EncoderOutputs:
    """Encoder outputs per (encoder fingerprint, batch of utterance ids), computed once and reused, bounded."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET, spill_dir: str | Path | None = None,
                 keep: bool = False, beyond: str = "cheaper") -> None:
        """``beyond``: what happens to a batch past the budget: ``cheaper`` (disk when writing it and reading it
        back costs less than the encoder did, else recomputed), ``disk``, or ``recompute``."""
        if beyond not in ("cheaper", "disk", "recompute"):
            raise ValueError(f"beyond={beyond!r}: expected cheaper, disk or recompute")
        self.beyond = beyond
        self.budget = int(budget_bytes)
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.keep = keep
        self._memory: dict[tuple, tuple[torch.Tensor, float]] = {}
        self._disk: dict[tuple, tuple[Path, float]] = {}
        self._seconds: dict[tuple, float] = {}  # encoder seconds of every batch ever computed
        self.held_bytes = 0
        self.peak_bytes = 0
        self.hits = 0  # batches served from memory or disk
        self.misses = 0  # batches the encoder ran for (first time or recomputed)
        self.recomputed = 0
        self.spilled = 0
        self.disk_bytes = 0

    def get(self, model: nn.Module, fp: str, ids: tuple[str, ...], features: Callable[[], torch.Tensor]
            ) -> tuple[torch.Tensor, float]:
        """The encoder output for this batch, and the seconds it took when it was computed (so speed figures
        stay comparable between the variant that computed it and those that reuse it). ``features()`` makes the
        batch's input features; it is called only when the encoder has to run."""
        key = (fp, ids)
        stored = self._stored(key)
        if stored is not None:
            return stored
        param = next(model.parameters())
        t0 = time.perf_counter()
        out = whisper.encode(model, features().to(param.device, param.dtype))
        seconds = time.perf_counter() - t0
        self.misses += 1
        if key in self._seconds:
            self.recomputed += 1
            seconds = self._seconds[key]
        else:
            self._seconds[key] = seconds
            self._store(key, out, seconds)
        return out, seconds

    def peek(self, fp: str, ids: tuple[str, ...]) -> torch.Tensor | None:
        """The stored output of this batch (from memory or disk), or None; never runs the encoder."""
        stored = self._stored((fp, ids))
        return stored[0] if stored is not None else None

    def _stored(self, key: tuple) -> tuple[torch.Tensor, float] | None:
        """A held batch's output and encoder seconds, from memory or disk (counted as a hit), or None."""
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        if key in self._disk:
            self.hits += 1
            path, seconds = self._disk[key]
            return safetensors.torch.load_file(str(path))["hidden"], seconds
        return None

    def _store(self, key: tuple, out: torch.Tensor, seconds: float) -> None:
        size = out.numel() * out.element_size()
        if self.held_bytes + size <= self.budget:
            self._memory[key] = (out, seconds)
            self.held_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)
            return
        if self.spill_dir is None or self.beyond == "recompute":
            return  # recomputed when asked for again
        t0 = time.perf_counter()
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"{fingerprint.of_json([key])[:24]}.safetensors"
        write_bytes(path, safetensors.torch.save({"hidden": out.detach().contiguous().cpu()}))
        write_seconds = time.perf_counter() - t0
        # reading back costs about what writing did: keep the file only when that beats running the encoder
        if self.beyond == "disk" or 2 * write_seconds < seconds:
            self._disk[key] = (path, seconds)
            self.spilled += 1
            self.disk_bytes += path.stat().st_size
        else:
            path.unlink(missing_ok=True)

    def report(self) -> dict[str, Any]:
        """What the cache did: batches computed / reused / recomputed / held on disk, and the bytes."""
        return {"budget_bytes": self.budget, "peak_memory_bytes": self.peak_bytes,
                "computed_batches": self.misses - self.recomputed, "reused_batches": self.hits,
                "recomputed_batches": self.recomputed, "spilled_batches": self.spilled, "disk_bytes": self.disk_bytes,
                "spill_dir": str(self.spill_dir) if self.spill_dir and self.keep else None}

    def close(self) -> None:
        """Forget the outputs; remove the spill directory unless ``keep``."""
        self._memory.clear()
        self.held_bytes = 0
        if self.spill_dir is not None and not self.keep:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self._disk.clear()


class TensorStore:
    """Tensors by key, in memory up to ``budget_bytes``, beyond it one safetensors file each in ``directory``
    (read back when asked for): fine-tuning's cached encoder outputs of every training utterance, which at
    ~2.3 MB each (tiny.en) would otherwise grow with the training set. ``close`` removes the files."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET, directory: str | Path | None = None) -> None:
        self.budget = int(budget_bytes)
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self._files: dict[str, Path] = {}
        self.held_bytes = 0
        self.disk_bytes = 0

    def put(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.held_bytes + size <= self.budget or self.directory is None:
            self._memory[key] = tensor
            self.held_bytes += size
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{fingerprint.of_json(key)[:24]}.safetensors"
        write_bytes(path, safetensors.torch.save({"t": tensor.detach().contiguous().cpu()}))
        self._files[key] = path
        self.disk_bytes += path.stat().st_size

    def get(self, key: str) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        return safetensors.torch.load_file(str(self._files[key]))["t"]

    def __contains__(self, key: str) -> bool:
        return key in self._memory or key in self._files

    def report(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget, "memory_bytes": self.held_bytes, "in_memory": len(self._memory),
                "on_disk": len(self._files), "disk_bytes": self.disk_bytes}

    def close(self) -> None:
        self._memory.clear()
        self.held_bytes = 0
        for path in self._files.values():
            path.unlink(missing_ok=True)
        self._files.clear()
        if self.directory is not None and self.directory.is_dir() and not any(self.directory.iterdir()):
            shutil.rmtree(self.directory, ignore_errors=True)
