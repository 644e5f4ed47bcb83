"""The one record every dataset reference resolves to."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000


@dataclass
class Utterance:
    """One utterance: float32 mono 16 kHz audio, its reference transcript, who spoke it and where it came from."""

    id: str  # stable, unique within the set
    audio: np.ndarray  # float32, mono, 16 kHz
    text: str  # reference transcript
    voice: str  # TTS voice ("hibari", "espeak:en-us+m3@160") or speaker ("real:1089") / "unknown"
    source: str  # corpus / group ("librispeech_test_clean", "ljspeech", "tts:harvard", ...)

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return len(self.audio) / SAMPLE_RATE


def fingerprint(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 of the ``id<TAB>text`` lines, in order: two sets with the same fingerprint hold the same
    utterances with the same transcripts."""
    h = hashlib.sha256()
    for uid, text in pairs:
        h.update(f"{uid}\t{text}\n".encode())
    return h.hexdigest()
