"""Reading the files of a checkpoint directory without trusting them: JSON (manifest, config, shard index),
``config.json`` checked before anything is allocated, and safetensors weights whose header is read and checked
here before the library maps the file. Every problem is a :class:`CheckpointError` naming the file and the key,
value or tensor at fault; nothing read here can run code or allocate more than the files hold.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from .errors import CheckpointError

MAX_JSON_BYTES = 64 << 20  # a manifest or config is kilobytes; a shard index of a huge model a few megabytes
MAX_HEADER_BYTES = 100 << 20  # the limit safetensors itself applies to a header
MAX_PARAMETERS = 20_000_000_000  # 13x Whisper large-v3 (1.55 B): a config beyond it is an error, not a model
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class HugeNumber(str):
    """A JSON integer too long to be a real value (Python refuses to convert past 4300 digits): kept as text so
    the check of the key that holds it can name it."""

    def __repr__(self) -> str:
        return f"<a {len(self)}-digit number>"


def _int(text: str) -> int | HugeNumber:
    return int(text) if len(text) <= 40 else HugeNumber(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_json(path: Path, what: str) -> Any:
    """The JSON document in ``path`` (``what`` it is, for messages): UTF-8 text of a bounded size, integers of
    any length kept (:class:`HugeNumber`), NaN/Infinity refused, nesting bounded by the parser."""
    if not path.is_file():
        raise CheckpointError(f"{path}: the {what} is missing or not a file")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is too large for a {what} (at most {MAX_JSON_BYTES})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: the {what} is not UTF-8 JSON text (byte {exc.start})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        return json.loads(text, parse_int=_int, parse_constant=_no_constant)
    except RecursionError:
        raise CheckpointError(f"{path}: the {what} is nested too deeply to be one") from None
    except ValueError as exc:  # JSONDecodeError and the refused constants
        raise CheckpointError(f"{path}: the {what} is not valid JSON: {exc}") from None


def json_object(path: Path, what: str) -> dict[str, Any]:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the {what} must be a JSON object, got {_kind(data)}")
    return data


def _kind(value: Any) -> str:
    return "a number too long to be one" if isinstance(value, HugeNumber) else f"{type(value).__name__} {value!r:.60}"


# --- config.json ---------------------------------------------------------------------------------------------

_DIMENSIONS = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
               "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size", "max_source_positions", "max_target_positions",
               "num_mel_bins")


def _parameter_terms(c: dict[str, int]) -> list[tuple[int, str]]:
    """The big terms of a Whisper's parameter count, each with the keys it grows with."""
    d = c["d_model"]
    return [
        (c["num_mel_bins"] * d * 3 + d * d * 3, "num_mel_bins x d_model (the input convolutions)"),
        (c["max_source_positions"] * d, "max_source_positions x d_model (encoder positions)"),
        (c["encoder_layers"] * (4 * d * d + 2 * d * c["encoder_ffn_dim"]),
         "encoder_layers x d_model x encoder_ffn_dim (encoder layers)"),
        (c["vocab_size"] * d, "vocab_size x d_model (token embeddings)"),
        (c["max_target_positions"] * d, "max_target_positions x d_model (decoder positions)"),
        (c["decoder_layers"] * (8 * d * d + 2 * d * c["decoder_ffn_dim"]),
         "decoder_layers x d_model x decoder_ffn_dim (decoder layers)"),
    ]


def check_config(path: Path, raw: dict[str, Any]) -> None:
    """Refuse a Whisper config whose dimensions are not positive integers, whose heads do not divide the width,
    or whose model would not fit in any memory (estimated from the dimensions, before anything is allocated)."""
    model_type = raw.get("model_type", "whisper")
    if model_type != "whisper":
        raise CheckpointError(f"{path}: model_type {model_type!r}; mla-registry loads Whisper checkpoints only")
    from transformers import WhisperConfig

    defaults = WhisperConfig()
    dims: dict[str, int] = {}
    for key in _DIMENSIONS:
        value = raw.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: {key} must be a positive integer, got {_kind(value)}")
        dims[key] = value
    for key in ("encoder_attention_heads", "decoder_attention_heads"):
        if dims["d_model"] % dims[key]:
            raise CheckpointError(f"{path}: {key}={dims[key]} does not divide d_model={dims['d_model']}; each head "
                                  "takes an equal share of the width")
    terms = _parameter_terms(dims)
    total = sum(n for n, _ in terms)
    if total > MAX_PARAMETERS:
        biggest = max(terms)[1]
        raise CheckpointError(f"{path}: these dimensions describe a model of {total:.3g} parameters "
                              f"({total * 4 / 1e12:.3g} TB in float32), mostly {biggest}; refused before "
                              f"allocating (at most {MAX_PARAMETERS:.3g})")


def read_config(ckpt_dir: Path):
    """``config.json`` as a checked :class:`~transformers.WhisperConfig`. No code named by the file
    (``auto_map``, ``trust_remote_code``) is imported: the class is always transformers' own."""
    from transformers import WhisperConfig

    path = ckpt_dir / "config.json"
    raw = json_object(path, "model config")
    check_config(path, raw)
    try:
        return WhisperConfig.from_pretrained(ckpt_dir)
    except Exception as exc:  # noqa: BLE001 - transformers' own validation (types, values): the file's fault
        raise CheckpointError(f"{path}: transformers refuses this config: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}") from None


# --- safetensors ---------------------------------------------------------------------------------------------

def _check_entry(path: Path, name: str, entry: Any, body: int) -> None:
    at = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{at}: header entry must be an object, got {_kind(entry)}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise CheckpointError(f"{at}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in shape):
        raise CheckpointError(f"{at}: shape must be a list of non-negative integers, got {shape!r:.80}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(n, int) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= body):
        raise CheckpointError(f"{at}: data_offsets {offsets!r:.80} are not within the file's {body} data bytes "
                              "(a truncated file?)")
    if math.prod(shape) * _DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise CheckpointError(f"{at}: shape {shape} of {dtype} does not match its {offsets[1] - offsets[0]} bytes")


def check_safetensors(path: Path) -> None:
    """Read and check the header of a safetensors file: its length against the file's size, JSON, one entry per
    tensor with a known dtype and offsets inside the file (so a truncated, random or hostile file is refused
    before any tensor is mapped)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file is missing or not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes is not a safetensors file (truncated or empty)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: the header claims {length} bytes but the file has {size}; not a "
                                  "safetensors file, or truncated")
        blob = f.read(length)
    try:
        header = json.loads(blob.decode("utf-8"), parse_int=_int, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON (a truncated or foreign "
                              "file?)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header must be an object, got {_kind(header)}")
    body = size - 8 - length
    ends = [0]
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry, body)
            ends.append(entry["data_offsets"][1])
    if max(ends) != body:
        raise CheckpointError(f"{path}: the header covers {max(ends)} data bytes, the file holds {body} "
                              "(truncated, or extra data appended)")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    check_safetensors(path)
    try:
        return safetensors.torch.load_file(path)
    except Exception as exc:  # noqa: BLE001 - whatever the reader still finds wrong is the file's fault
        raise CheckpointError(f"{path}: cannot read the weights: {type(exc).__name__}: {exc}") from None


def _shard_path(ckpt_dir: Path, index: Path, name: Any) -> Path:
    """The shard ``name`` inside ``ckpt_dir``: a relative path that stays inside it (judged by its parts, not by
    resolving links: hub caches link shards to blobs elsewhere)."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: weight_map values must be file names, got {_kind(name)}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or ":" in name:
        raise CheckpointError(f"{index}: shard {name!r} is outside the checkpoint directory; refused (shards "
                              "must be files inside it)")
    return ckpt_dir / pure


def read_sharded(ckpt_dir: Path, index: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """The tensors of a sharded checkpoint, each loaded from the file its index names, and where each came from."""
    data = json_object(index, "shard index")
    wmap = data.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor -> shard file, got "
                              f"{_kind(wmap)}")
    files = {name: _shard_path(ckpt_dir, index, name) for name in dict.fromkeys(wmap.values())}
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for name, path in files.items():
        if not path.is_file():
            raise CheckpointError(f"{index}: shard {name!r} is missing or not a file")
        for key, tensor in load_safetensors(path).items():
            state[key], origin[key] = tensor, path
    listed_elsewhere = [k for k, f in wmap.items() if origin.get(k) != files[f]]
    if listed_elsewhere:
        raise CheckpointError(f"{index}: tensors not found in the shard the index names: {listed_elsewhere[:5]}")
    return state, origin


def read_weights(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """The checkpoint's tensors (``model.safetensors``, or the shards of ``model.safetensors.index.json``) and
    the file each came from. Pickled weights (``pytorch_model.bin``) are never read."""
    single = ckpt_dir / "model.safetensors"
    index = ckpt_dir / "model.safetensors.index.json"
    if single.exists():
        state = load_safetensors(single)
        return state, dict.fromkeys(state, single)
    if index.exists():
        return read_sharded(ckpt_dir, index)
    pickled = " (pytorch_model.bin is pickled weights, which mla-registry never unpickles)" if (
        ckpt_dir / "pytorch_model.bin").exists() else ""
    raise CheckpointError(f"{ckpt_dir}: no model.safetensors (or model.safetensors.index.json) in this "
                          f"directory{pickled}")


def check_tensors(state: dict[str, torch.Tensor], origin: dict[str, Path], expected: dict[str, torch.Tensor]
                  ) -> None:
    """Refuse integer or boolean tensors where the model holds floats (no silent cast), and NaN or infinite
    weights, naming the tensor and its file."""
    for key, tensor in state.items():
        want = expected.get(key)
        where = f"{origin.get(key, '?')}: tensor {key!r}"
        if want is not None and want.is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(f"{where} is {str(tensor.dtype).replace('torch.', '')}; the model holds "
                                  f"{str(want.dtype).replace('torch.', '')} there (refused: no silent cast)")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{where} holds {bad} NaN or infinite value(s); refused (a model with them "
                                  "computes nothing meaningful)")
