"""Synthesised speech sets (builtin:tts-test / tts-valid / tts-train): choose sentences deterministically, voice
them with hibari-tts (neural, its bundled "heart" voice at three speeds) and espeak-ng (four formant voices),
and cache the set as an audiofolder (16 kHz 16-bit wav + metadata.csv + manifest.json).

espeak-ng missing is a DataError (``apt-get install espeak-ng``) rather than a hibari-only fallback: a set with a
different voice mix is a different test set, and WERs measured on it would not be comparable."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mla_registry.atomic import atomic_dir, write_json
from mla_registry.errors import DataError
from mla_registry.storage import cache_dir

from .text import Sentence, sentence_pool
from .utterance import SAMPLE_RATE, fingerprint

#: bump when sentence selection, voices or audio processing change: it is part of the cache key
VERSION = "tts-v1"
SPLITS = {"test": 304, "valid": 104, "train": 600}
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Voice:
    """A voice of the mix: ``name`` is what Utterance.voice records; ``weight`` its share of every block of 8."""

    name: str
    engine: str  # "hibari" or "espeak"
    weight: int
    speed: float  # hibari: relative pace (1.0 = model's own); espeak: words per minute
    espeak_voice: str = ""


VOICE_MIX: tuple[Voice, ...] = (
    Voice("hibari", "hibari", 2, 1.0),
    Voice("hibari@0.9", "hibari", 1, 0.9),
    Voice("hibari@1.15", "hibari", 1, 1.15),
    # espeak-ng variants chosen among 18 tried for being the most intelligible to Whisper tiny.en (~15-22 % WER
    # on 16 sentences each; the +f2/+f4 female variants were 33-37 %)
    Voice("espeak:en-us+m3@160", "espeak", 1, 160, "en-us+m3"),
    Voice("espeak:en-us+m7@160", "espeak", 1, 160, "en-us+m7"),
    Voice("espeak:en-gb+f3@145", "espeak", 1, 145, "en-gb+f3"),
    Voice("espeak:en-gb-x-rp+m3@150", "espeak", 1, 150, "en-gb-x-rp+m3"),
)


@dataclass(frozen=True)
class Item:
    """One utterance to synthesise."""

    id: str
    text: str
    voice: str
    source: str
    seed: int


def plan(split: str, size: int, seed: int, real_texts: list[str]) -> list[Item]:
    """The utterances of a set, without audio. Deterministic in (split, seed); a smaller size is a prefix of a
    larger one. Sentences interleave the corpora in turn; voices follow shuffled blocks of the mix."""
    pools = sentence_pool(split, real_texts)
    rng = random.Random(f"{VERSION}:{split}:{seed}")
    queues: dict[str, list[Sentence]] = {}
    for corpus in sorted(pools):
        q = list(pools[corpus])
        rng.shuffle(q)
        queues[corpus] = q
    order = sorted(queues)
    rng.shuffle(order)
    chosen: list[Sentence] = []
    while len(chosen) < size and any(queues.values()):
        for corpus in order:
            if queues[corpus] and len(chosen) < size:
                chosen.append(queues[corpus].pop())
    if len(chosen) < size:
        raise DataError(f"builtin:tts-{split}: size {size} exceeds the {len(chosen)} sentences available")
    voices: list[str] = []
    while len(voices) < size:
        block = [v.name for v in VOICE_MIX for _ in range(v.weight)]
        rng.shuffle(block)
        voices.extend(block)
    items = []
    for i, (s, voice) in enumerate(zip(chosen, voices)):
        uid = f"{i:04d}_{s.corpus}_{s.sid}"
        useed = int.from_bytes(hashlib.sha256(f"{seed}:{uid}".encode()).digest()[:4], "big")
        items.append(Item(uid, s.text, voice, f"tts:{s.corpus}", useed))
    return items


def plan_fingerprint(items: list[Item]) -> str:
    """Fingerprint of ids and texts (the same function the loaded utterances are fingerprinted with)."""
    return fingerprint((it.id, it.text) for it in items)


def plan_key(items: list[Item]) -> str:
    """Hash of everything that decides the audio (ids, texts, voices, seeds, voice mix): a cached set is reused
    only when its manifest has the same key."""
    h = hashlib.sha256(repr([asdict(v) for v in VOICE_MIX]).encode())
    for it in items:
        h.update(f"{it.id}\t{it.text}\t{it.voice}\t{it.seed}\n".encode())
    return h.hexdigest()


def set_dir(split: str, size: int, seed: int) -> Path:
    """Cache directory of a set: name + size + seed + VERSION."""
    return cache_dir("data") / f"tts-{split}-n{size}-s{seed}-{VERSION}"


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a built set, or None when the set is missing or incomplete."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (directory / "metadata.csv").is_file():
        return None
    return manifest


def espeak_binary() -> str:
    """Path of espeak-ng; a DataError with the install command when it is missing."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError(
            "the builtin TTS sets need espeak-ng for half of their voices, and it is not on PATH: "
            "install it (Debian/Ubuntu: apt-get install espeak-ng; macOS: brew install espeak-ng)"
        )
    return exe


def _espeak_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"(\d+\.\d+[\w.\-]*)", out)
    return f"espeak-ng {m.group(1)}" if m else "unknown"


def _hibari(voice: str = "heart") -> Any:
    try:
        from hibari import Hibari
    except ImportError as e:
        raise DataError(
            "the builtin TTS sets need hibari-tts for half of their voices: pip install 'mla-registry[tts]' "
            "(or pip install hibari-tts)"
        ) from e
    return Hibari(voice=voice, threads=1)


def _hibari_version() -> str:
    try:
        from importlib.metadata import version

        return version("hibari-tts")
    except Exception:  # noqa: BLE001 - a version string is provenance, never a reason to fail
        return "unknown"


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """Resample to 16 kHz (torchcodec/ffmpeg) and write 16-bit mono wav."""
    import torch
    from torchcodec.encoders import AudioEncoder

    x = torch.from_numpy(np.clip(np.asarray(samples, np.float32), -1.0, 1.0)).reshape(1, -1)
    AudioEncoder(x, sample_rate=rate).to_file(str(path), sample_rate=SAMPLE_RATE, num_channels=1)


def _espeak(exe: str, voice: Voice, text: str) -> tuple[np.ndarray, int]:
    from torchcodec.decoders import AudioDecoder

    cmd = [exe, "-v", voice.espeak_voice, "-s", str(int(voice.speed)), "--stdout"]
    try:
        proc = subprocess.run(cmd, check=False, input=text.encode(), capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise DataError(f"espeak-ng failed for voice {voice.name!r}: {e}") from e
    if proc.returncode != 0 or not proc.stdout:
        raise DataError(f"espeak-ng failed for voice {voice.name!r} (exit {proc.returncode}): "
                        f"{proc.stderr.decode(errors='replace').strip()[:200]}")
    s = AudioDecoder(proc.stdout).get_all_samples()
    return s.data.numpy().mean(axis=0), int(s.sample_rate)


def build(name: str, split: str, size: int, seed: int, items: list[Item], target: Path, quiet: bool) -> dict:
    """Synthesise ``items`` into ``target`` (atomically) and return the manifest written there."""
    from tqdm.auto import tqdm

    voices = {v.name: v for v in VOICE_MIX}
    exe = espeak_binary() if any(voices[it.voice].engine == "espeak" for it in items) else ""
    tts = _hibari() if any(voices[it.voice].engine == "hibari" for it in items) else None
    t0 = time.perf_counter()
    audio_s = 0.0
    with atomic_dir(target) as tmp:
        rows = []
        for it in tqdm(items, desc=f"synthesising {name}", unit="utt", disable=quiet):
            v = voices[it.voice]
            if v.engine == "hibari":
                samples, rate = tts(it.text, speed=v.speed, seed=it.seed), tts.sample_rate
            else:
                samples, rate = _espeak(exe, v, it.text)
            if samples.size == 0 or float(np.max(np.abs(samples))) < 1e-4:
                raise DataError(f"{name}: {v.name} produced no audio for {it.id!r}: {it.text!r}")
            audio_s += samples.size / rate
            fname = f"{it.id}.wav"
            _write_wav(tmp / fname, samples, rate)
            rows.append((fname, it.text, it.voice, it.source))
        with open(tmp / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "transcription", "voice", "source"])
            w.writerows(rows)
        manifest = {
            "name": name,
            "split": split,
            "size": size,
            "seed": seed,
            "version": VERSION,
            "fingerprint": plan_fingerprint(items),
            "plan_key": plan_key(items),
            "voices": dict(Counter(it.voice for it in items)),
            "sources": dict(Counter(it.source for it in items)),
            "voice_mix": [asdict(v) for v in VOICE_MIX],
            "hibari": _hibari_version() if tts is not None else None,
            "espeak_ng": _espeak_version(exe) if exe else None,
            "audio_seconds": round(audio_s, 1),
            "build_seconds": round(time.perf_counter() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest
