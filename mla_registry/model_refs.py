"""Model references: a hub id (``openai/whisper-tiny.en``), a local directory (plain Hugging Face or an
mla-registry checkpoint), or ``bundled:whisper-tiny.en`` (imported from an installed package, no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from . import checkpoint
from .errors import ModelRefError

DEFAULT_MODEL = "bundled:whisper-tiny.en"


def resolve(ref: str) -> str:
    """A local directory for ``bundled:`` refs and directories, else the hub id unchanged."""
    if ref.startswith("bundled:"):
        from .bundled import resolve_bundled

        return str(resolve_bundled(ref))
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelRefError(f"model '{ref}': {path} exists but is not a model directory (no config.json)")
        return str(path)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelRefError(f"model '{ref}': no such directory")
    return ref


def load_model(ref: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load the model behind ``ref``; local directories go through :func:`mla_registry.checkpoint.load`, so
    converted attention is rebuilt from the manifest and weights load strictly."""
    where = resolve(ref)
    if Path(where).is_dir():
        return checkpoint.load(where, device=device, dtype=dtype)
    try:
        model = WhisperForConditionalGeneration.from_pretrained(where, dtype=dtype)
    except OSError as exc:
        raise ModelRefError(
            f"model '{ref}' could not be loaded from the Hugging Face hub ({exc}). Offline, use a local directory "
            "or 'bundled:whisper-tiny.en'."
        ) from None
    return model.to(device).eval()


PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json")


def load_processor(ref: str) -> WhisperProcessor:
    """The processor (feature extractor + tokenizer) saved with the model behind ``ref``. A local directory's
    JSON files are checked first (each must be a JSON object), so a broken one is named, not a traceback from
    the tokenizer library."""
    from .checkpoint_files import json_object
    from .errors import CheckpointError

    where = resolve(ref)
    if Path(where).is_dir():
        for name in PROCESSOR_FILES:
            if (Path(where) / name).exists():
                try:
                    json_object(Path(where) / name, "processor file")
                except CheckpointError as exc:
                    raise ModelRefError(f"model '{ref}': {exc}") from None
    try:
        return WhisperProcessor.from_pretrained(where)
    except OSError as exc:
        raise ModelRefError(f"model '{ref}': no processor files ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - valid JSON the tokenizer library still refuses: the files' fault
        raise ModelRefError(f"model '{ref}': its processor files cannot be read: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}") from None


def load(ref: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """``(model, processor)`` for ``ref``."""
    return load_model(ref, device, dtype), load_processor(ref)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``float32``/``bfloat16``/``float16`` (or None) as a torch dtype; a clear error for anything else."""
    if name in (None, "", "auto"):
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    try:
        return table[name]
    except KeyError:
        raise ModelRefError(f"dtype '{name}' is not one of {', '.join(table)}") from None


DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto")


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a usable torch device on this machine (``cpu``, ``cuda``, ``cuda:N``, ``mps``), or
    None when it is."""
    import re

    if name == "cpu":
        return None
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m:
        if not torch.cuda.is_available():
            return f"no CUDA GPU is available here (torch {torch.__version__}); use cpu"
        if m[1] is not None and int(m[1]) >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0..)"
        return None
    if name == "mps":
        ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        return None if ok else "Apple's Metal backend is not available here"
    return "not a torch device; use cpu, cuda, cuda:N or mps"


def check_device(name: str) -> str:
    """``name`` when it is a usable device, else a :class:`ModelRefError` saying why."""
    problem = device_problem(name)
    if problem:
        raise ModelRefError(f"device '{name}': {problem}")
    return name
