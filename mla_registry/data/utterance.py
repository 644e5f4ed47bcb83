"""The one record every dataset reference resolves to."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import numpy as np

SAMPLE_RATE = 16000


class Utterance:
    """One utterance: float32 mono 16 kHz audio, its reference transcript, who spoke it and where it came from.

    The audio is either held (``audio=`` an array) or read when asked for (``loader=`` a function returning it):
    a test set opened lazily knows every id and transcript up front and decodes each file only when its batch is
    transcribed, so its memory does not grow with its size. A lazy utterance does not keep its audio (each
    access decodes again); it remembers the duration once known."""

    __slots__ = ("id", "text", "voice", "source", "_audio", "_loader", "_seconds")

    def __init__(self, id: str, audio: np.ndarray | None, text: str, voice: str, source: str,  # noqa: A002
                 loader: Callable[[], np.ndarray] | None = None) -> None:
        if audio is None and loader is None:
            raise ValueError(f"utterance {id!r}: give its audio or a loader")
        self.id, self.text, self.voice, self.source = id, text, voice, source
        self._audio, self._loader = audio, loader
        self._seconds = None if audio is None else len(audio) / SAMPLE_RATE

    @property
    def audio(self) -> np.ndarray:
        """The samples (decoded now when the utterance is lazy)."""
        if self._audio is not None:
            return self._audio
        samples = self._loader()
        self._seconds = len(samples) / SAMPLE_RATE
        return samples

    @audio.setter
    def audio(self, samples: np.ndarray) -> None:
        self._audio, self._seconds = samples, len(samples) / SAMPLE_RATE

    @property
    def lazy(self) -> bool:
        return self._audio is None

    @property
    def duration_known(self) -> bool:
        """Whether :attr:`duration` is known without decoding the audio."""
        return self._seconds is not None

    @property
    def duration(self) -> float:
        """Seconds of audio (decoding it once if it was never read)."""
        if self._seconds is None:
            _ = self.audio
        return self._seconds

    def __repr__(self) -> str:
        return f"Utterance({self.id!r}, {self.text[:30]!r}, voice={self.voice!r}, source={self.source!r})"


def fingerprint(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 of the ``id<TAB>text`` lines, in order: two sets with the same fingerprint hold the same
    utterances with the same transcripts."""
    h = hashlib.sha256()
    for uid, text in pairs:
        h.update(f"{uid}\t{text}\n".encode())
    return h.hexdigest()
