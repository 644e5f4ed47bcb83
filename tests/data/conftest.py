"""Fixtures for the data tests: a private cache directory and small audio files written on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture
def data_cache(tmp_path, monkeypatch) -> Path:
    """``MLA_REGISTRY_CACHE`` pointed at an empty directory of this test's own."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MLA_REGISTRY_CACHE", str(root))
    return root


def _tone(seconds: float, rate: int, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    """A sine tone (frames x channels for stereo), loud enough to pass the silence check."""
    t = np.arange(round(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.fixture
def wav_dir(tmp_path) -> Path:
    """Three audio files at 16 kHz, 22.05 kHz and 44.1 kHz stereo (flac), 1.0 / 1.5 / 0.5 s long."""
    d = tmp_path / "clips"
    d.mkdir()
    sf.write(d / "a.wav", _tone(1.0, 16000), 16000)
    sf.write(d / "b.wav", _tone(1.5, 22050), 22050)
    sf.write(d / "c.flac", _tone(0.5, 44100, channels=2), 44100)
    return d


@pytest.fixture
def tone():
    """The tone generator used by ``wav_dir``: ``tone(seconds, rate, channels=1, freq=220.0)``."""
    return _tone
