"""The Whisper family adapter: names the attention slots of a Whisper model.

Slots are ``encoder.self.N``, ``decoder.self.N`` and ``decoder.cross.N``; each knows its module path and the
shape facts a builder needs.
"""

from __future__ import annotations

import torch
from torch import nn

from .builder import Slot
from .data.utterance import SAMPLE_RATE

FAMILY = "whisper"
KINDS = ("encoder.self", "decoder.self", "decoder.cross")


def _base(model: nn.Module) -> tuple[nn.Module, str]:
    """The ``WhisperModel`` inside ``model`` and its path prefix."""
    if hasattr(model, "model") and hasattr(model.model, "encoder"):
        return model.model, "model."
    if hasattr(model, "encoder") and hasattr(model, "decoder"):
        return model, ""
    raise TypeError(f"{type(model).__name__} is not a Whisper model (no encoder/decoder)")


def slots(model: nn.Module) -> list[Slot]:
    """Every attention slot of ``model``, in a stable order (encoder self, then per decoder layer self, cross)."""
    base, prefix = _base(model)
    config = model.config
    out: list[Slot] = []
    for i, layer in enumerate(base.encoder.layers):
        out.append(_slot(config, f"{prefix}encoder.layers.{i}.self_attn", "encoder.self", i, layer.self_attn,
                         heads=config.encoder_attention_heads, causal=False, cross=False, layer_idx=None))
    for i, layer in enumerate(base.decoder.layers):
        out.append(_slot(config, f"{prefix}decoder.layers.{i}.self_attn", "decoder.self", i, layer.self_attn,
                         heads=config.decoder_attention_heads, causal=True, cross=False, layer_idx=i))
        out.append(_slot(config, f"{prefix}decoder.layers.{i}.encoder_attn", "decoder.cross", i,
                         layer.encoder_attn, heads=config.decoder_attention_heads, causal=False, cross=True,
                         layer_idx=i))
    return out


def _slot(config, path, kind, i, module, *, heads, causal, cross, layer_idx) -> Slot:
    return Slot(
        path=path, kind=kind, layer=i, embed_dim=config.d_model, num_heads=heads, is_causal=causal,
        is_cross=cross, bias=True, dropout=float(config.attention_dropout), layer_idx=layer_idx, config=config,
    )


# --- inputs -------------------------------------------------------------------------------------------------


def input_features(processor, audios, device=None, dtype=None):
    """Log-mel features ``[B, mels, 3000]`` for a list of 16 kHz float arrays (30 s windows, as Whisper trains)."""
    feats = processor.feature_extractor(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    return feats.to(device=device, dtype=dtype) if device is not None or dtype is not None else feats


# On CPU the encoder runs faster in small slices of a batch than on the whole batch: its activations (1500
# frames x 4 * d_model per row) stay in cache. Measured for tiny.en on 2 EPYC cores, 16 real clips: 241, 235, 272,
# 270 and 333 ms per clip at slices of 1, 2, 4, 8 and 16 rows, outputs bit-identical. GPUs get the whole batch.
CPU_ENCODER_SLICE = 2


def encode(model, feats: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden state ``[B, frames, d]`` for features ``[B, mels, 3000]``, in slices of
    :data:`CPU_ENCODER_SLICE` rows on CPU (the same values: each row is encoded on its own either way)."""
    encoder = model.get_encoder()
    if feats.device.type != "cpu" or feats.shape[0] <= CPU_ENCODER_SLICE:
        return encoder(feats).last_hidden_state
    return torch.cat([encoder(feats[i:i + CPU_ENCODER_SLICE]).last_hidden_state
                      for i in range(0, feats.shape[0], CPU_ENCODER_SLICE)])


def decoder_hidden(decoder: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                   encoder_hidden_states: torch.Tensor | None, cache, cache_kwarg: str) -> torch.Tensor:
    """The decoder's output ``[B, q, d]`` (after its final layer norm) for ``input_ids [B, q]`` at ``positions
    [q]``, through its own layers and attention modules with ``cache`` (passed to the layers as ``cache_kwarg``,
    the host's name for it) and no attention mask: the host decoder's arithmetic without its per-call
    bookkeeping (mask construction, output capture), which the ONNX export's graphs need to trace one step. The
    modules apply causality themselves, so ``q > 1`` is only for a call without a cached prefix.
    ``encoder_hidden_states=None`` says the cross cache is filled: each layer then gets its own input in its
    place (a layer skips cross-attention when it gets None; the filled cache never reads it). The greedy loop
    keeps the host's forward: calling the layers directly measured 1.01x per step at batch 1 and 16 (2 CPU
    cores, interleaved), within noise."""
    hidden = decoder.embed_tokens(input_ids) + decoder.embed_positions.weight[positions]
    for layer in decoder.layers:
        states = hidden if encoder_hidden_states is None else encoder_hidden_states
        out = layer(hidden, attention_mask=None, encoder_hidden_states=states, use_cache=True,
                    **{cache_kwarg: cache})
        hidden = out[0] if isinstance(out, tuple) else out
    return decoder.layer_norm(hidden)


TASKS = ("transcribe", "translate")


def is_multilingual(model) -> bool:
    return bool(getattr(model.generation_config, "is_multilingual", False))


def check_language(model, language: str | None, task: str = "transcribe") -> None:
    """Refuse a language or task the model cannot decode with, naming the value: an English-only model decodes
    English transcripts only; a multilingual one takes the languages its generation config lists."""
    from .errors import KwargError

    if task not in TASKS:
        raise KwargError(f"decoding.task={task!r}: allowed values: {', '.join(TASKS)}")
    if not is_multilingual(model):
        if language not in (None, "en") or task != "transcribe":
            raise KwargError(f"decoding.language={language!r}, task={task!r}: this model is English-only; it "
                             "transcribes English (language en or unset, task transcribe)")
        return
    known = getattr(model.generation_config, "lang_to_id", None) or {}
    if language is not None and f"<|{language}|>" not in known:
        codes = sorted(k.strip("<|>") for k in known)
        raise KwargError(f"decoding.language={language!r} is not a language of this model; codes: "
                         f"{', '.join(codes[:20])}{', ...' if len(codes) > 20 else ''}")


def prompt_ids(model, language: str | None = None, task: str = "transcribe") -> list[int]:
    """The decoder prompt generate() starts from: ``<|startoftranscript|>``, for a multilingual model the
    language and task tokens (English when no language is given: teacher forcing needs one), then
    ``<|notimestamps|>``."""
    gen = model.generation_config
    ids = [gen.decoder_start_token_id]
    if is_multilingual(model):
        ids.append(gen.lang_to_id[f"<|{language or 'en'}|>"])
        ids.append(gen.task_to_id[task])
    no_ts = getattr(gen, "no_timestamps_token_id", None)
    if no_ts is not None:
        ids.append(no_ts)
    return ids


def teacher_forcing(model, tokenizer, texts, device=None):
    """``(decoder_input_ids, labels, mask)`` for transcripts: prompt + text + eos; labels are the inputs shifted
    left, -100 on the prompt and padding."""
    prompt = prompt_ids(model)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    seqs = [prompt + tokenizer(" " + t.strip(), add_special_tokens=False).input_ids + [eos] for t in texts]
    width = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(seqs), width), eos, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
        labels[i, len(prompt) - 1 : len(s) - 1] = torch.tensor(s[len(prompt):])
    mask = labels != -100
    return inputs.to(device), labels.to(device), mask.to(device)
