"""mla_registry.decoding: the greedy loop's tokens are generate()'s, for the stock model and every built-in
plugin (through the same cache interface), on real speech; a multilingual model gets its language/task prompt;
evaluation through either decoder gives the same transcripts and records which one ran."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from mla_registry import data, decoding, evaluate, model_refs, whisper
from mla_registry.convert import convert_model
from mla_registry.decode_cache import FilledOnceLayer, PreallocatedLayer

VARIANTS = {
    "stock": [],
    "mha": ["decoder.*=mha"],
    "gqa2": ["decoder.*=gqa:kv_heads=2"],
    "mla192": ["decoder.*=mla:rank=192,init=svd"],  # absorbed (the default): attention in latent space
}


@pytest.fixture(scope="module")
def tiny():
    """tiny.en, eight real clips of different lengths (rows finish at different steps: the loop drops them) and
    their encoder output, shared by every variant (only decoder attention is converted)."""
    model, processor = model_refs.load("bundled:whisper-tiny.en")
    utts = data.load("builtin:real", limit=8, quiet=True)
    with torch.no_grad():
        hidden = model.get_encoder()(whisper.input_features(processor, [u.audio for u in utts])).last_hidden_state
    return model, processor, utts, hidden


def generated(sequences: torch.Tensor, prompt: int, eos: int) -> list[list[int]]:
    """Each row's tokens after the prompt, up to and including its first end-of-text."""
    out = []
    for row in sequences[:, prompt:].tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def reference(model, hidden, max_new_tokens, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), num_beams=1,
                              do_sample=False, max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                              **kwargs).sequences


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loop_tokens_equal_generate(tiny, name, monkeypatch):
    base, processor, _, hidden = tiny
    model = base
    if VARIANTS[name]:
        model = copy.deepcopy(base)
        convert_model(model, processor, VARIANTS[name])
        model.eval()
    eos = model.generation_config.eos_token_id
    for max_new in (96, 6):  # natural end for every row, and a cap that cuts rows off mid-sentence
        ref = reference(model, hidden, max_new)
        prompt = len(whisper.prompt_ids(model))
        # finished rows dropped at the first one, at a quarter of the batch (the default), never: finished rows
        # that still run along must not write tokens
        for compact_at in (0.01, decoding.COMPACT_AT, 1.0):
            monkeypatch.setattr(decoding, "COMPACT_AT", compact_at)
            res = decoding.greedy(model, hidden, max_new)
            assert res.prompt_length == prompt
            assert generated(res.sequences, prompt, eos) == generated(ref, prompt, eos), (name, max_new, compact_at)
            assert torch.equal(res.sequences, ref), (name, max_new, compact_at)  # padded with eos alike
    assert res.kv.cross_per_utterance > 0 and res.kv.self_per_token > 0


def test_finished_rows_that_run_along_write_nothing(tiny, monkeypatch):
    """Rows that finished but are not dropped yet keep being decoded; what they produce is discarded. A model
    that keeps talking after end-of-text shows it: dropping rows at once or never gives the same sequences."""
    model, _, _, hidden = tiny
    eos = model.generation_config.eos_token_id
    inner = decoding.DecoderStep(model)

    def chatty(ids, hidden, cache):
        logits = inner(ids, hidden, cache)
        logits[ids[:, -1] == eos, 1000] = 1e4  # after end-of-text, always token 1000
        return logits

    runs = []
    for compact_at in (0.01, 1.0):
        monkeypatch.setattr(decoding, "COMPACT_AT", compact_at)
        runs.append(decoding.greedy(model, hidden, 96, step=chatty).sequences)
    assert (runs[0] == eos).any(dim=1).all()  # every row ended
    assert torch.equal(runs[0], runs[1])


def test_multilingual_prompt_and_language_detection():
    """whisper-base (multilingual): with language=en the prompt is start, <|en|>, transcribe, notimestamps;
    without a language, the detected one is generate()'s. Tokens equal generate()'s in both cases."""
    model, processor = model_refs.load("bundled:whisper-base")
    utts = data.load("builtin:real?source=librispeech_test_clean", limit=2, quiet=True)
    with torch.no_grad():
        hidden = model.get_encoder()(whisper.input_features(processor, [u.audio for u in utts])).last_hidden_state
    eos = model.generation_config.eos_token_id
    res = decoding.greedy(model, hidden, 48, language="en")
    gen = model.generation_config
    assert res.sequences[0, :4].tolist() == [gen.decoder_start_token_id, gen.lang_to_id["<|en|>"],
                                             gen.task_to_id["transcribe"], gen.no_timestamps_token_id]
    assert generated(res.sequences, 4, eos) == generated(reference(model, hidden, 48, language="en",
                                                                   task="transcribe"), 4, eos)
    detected = decoding.greedy(model, hidden, 48)
    ref = reference(model, hidden, 48, task="transcribe")
    assert detected.sequences[:, :4].tolist() == ref[:, :4].tolist()
    assert generated(detected.sequences, 4, eos) == generated(ref, 4, eos)


def test_evaluate_with_either_decoder_gives_the_same_transcripts(tiny):
    model, processor, utts, _ = tiny
    runs = {d: evaluate.evaluate(model, processor, utts[:4], evaluate.DecodeSettings(batch_size=4, decoder=d),
                                 quiet=True) for d in decoding.DECODERS}
    loop, gen = runs["loop"], runs["generate"]
    assert loop["decoding"]["decoder"] == "loop" and gen["decoding"]["decoder"] == "generate"
    assert loop["wer"] == gen["wer"] and loop["generated_tokens"] == gen["generated_tokens"]
    for key in ("kv_self_bytes_per_utterance", "kv_cross_bytes_per_utterance", "kv_self_bytes_per_token"):
        assert loop[key] == pytest.approx(gen[key]), key
    assert loop["torch_threads"] == torch.get_num_threads() >= 1


def test_preallocated_layer_fills_one_buffer_in_place():
    layer = PreallocatedLayer(capacity=5)
    a, b = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 1, 4)
    layer.update(a, a + 1)
    storage = layer.keys.data_ptr()
    keys, values = layer.update(b, b + 1)
    assert torch.equal(keys, torch.cat([a, b], dim=-2)) and torch.equal(values, torch.cat([a, b], dim=-2) + 1)
    assert keys.data_ptr() == storage and layer.get_seq_length() == 3  # no copy, no reallocation
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, torch.cat([a, b], dim=-2)[1:])
    with pytest.raises(RuntimeError, match="holds 5 positions"):
        layer.update(torch.randn(1, 3, 3, 4), torch.randn(1, 3, 3, 4))


def test_cross_layer_keeps_the_modules_tensors_without_a_copy():
    layer = FilledOnceLayer()
    k, v = torch.randn(2, 1, 1500, 8), torch.randn(2, 1, 1500, 0)
    keys, values = layer.update(k, v)
    assert keys is k and values is v and layer.get_seq_length() == 1500  # the entry, not a copy of it
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, k[1:])
    more = torch.randn(1, 1, 2, 8)
    assert torch.equal(layer.update(more, torch.randn(1, 1, 2, 0))[0], torch.cat([k[1:], more], dim=-2))


def test_a_module_that_replaces_its_entry_keeps_a_dynamic_layer():
    """The plugin guide lets a module trim its cache entry (a sliding window); the preallocated layer then grows
    the module's tensors as a DynamicLayer would instead of overwriting them."""
    layer = PreallocatedLayer(capacity=8)
    layer.update(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    layer.keys, layer.values = layer.keys[..., -2:, :], layer.values[..., -2:, :]  # keep the last two
    keys, _ = layer.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    assert keys.shape[-2] == 3 and torch.equal(keys[..., -1, :], torch.zeros(1, 1, 2))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's
def test_compiled_step_gives_the_loops_tokens(tiny):
    """``DecoderStep(compile=True)`` (torch.compile, dynamic shapes): past the prefill, through rows dropped from
    the batch (recompilations) and for a second model in the same process, the tokens are the plain loop's.
    With the preallocated cache's views among the graph's inputs, aot-autograd failed at the first
    recompilation on torch 2.13 ("Expected !size_bytes_is_heap_allocated_")."""
    base, processor, _, hidden = tiny
    mla = copy.deepcopy(base)
    convert_model(mla, processor, VARIANTS["mla192"])
    mla.eval()
    for model in (base, mla):
        plain = decoding.greedy(model, hidden, 96).sequences
        compiled = decoding.greedy(model, hidden, 96, step=decoding.DecoderStep(model, compile=True)).sequences
        assert torch.equal(compiled, plain)
        assert len({row.index(50256) for row in plain.tolist()}) > 2  # rows ended at different steps: dropped
