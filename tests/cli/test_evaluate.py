"""``mla-registry evaluate`` through click: one clean run, and every bad option a usage error naming it."""

import json

import numpy as np
import pytest
import soundfile as sf

DATA = "builtin:real?source=jfk"


def test_evaluate_prints_and_writes(invoke, tiny_base, tmp_path):
    out = tmp_path / "eval"
    result = invoke("evaluate", "--model", tiny_base, "--data", DATA, "--max-new-tokens", "4", "--out", out,
                    "--quiet", "--format", "github")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["utterances"] == 1 and metrics["decoding"] == {"batch_size": 16, "num_beams": 1,
                                                                  "max_new_tokens": 4, "language": None,
                                                                  "task": "transcribe", "decoder": "loop"}
    assert "| all " in result.output  # the github table
    assert invoke("evaluate", "--model", tiny_base, "--data", DATA, "--max-new-tokens", "4", "--out", out,
                  "--quiet").exit_code == 0  # a previous evaluation's directory may be written again


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "--batch-size: 0"), (["--batch-size", "-1"], "--batch-size"), (["--beams", "0"], "--beams"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--max-new-tokens", "100000"], "--max-new-tokens: 100000"),
    (["--max-new-tokens", "447"], "446 after its prompt"), (["--limit", "0"], "--limit"),
    (["--device", "cuda"], "no CUDA GPU"), (["--device", "quantum"], "not a torch device"),
    (["--format", "nosuch"], "--format"), (["--decoder", "beam"], "--decoder"),
    (["--batch-size", "many"], "--batch-size"),
])
def test_bad_options_are_usage_errors(invoke, tiny_base, args, message):
    import torch

    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = invoke("evaluate", "--model", tiny_base, "--data", DATA, "--quiet", *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and "WER" not in result.output


def test_nothing_to_evaluate_is_an_error(invoke, tiny_base, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    sf.write(d / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    (d / "metadata.csv").write_text("file_name,transcription\nsilent.wav,nothing here\n")
    result = invoke("evaluate", "--model", tiny_base, "--data", d, "--skip-bad", "--quiet")
    assert result.exit_code == 1 and "every one of its 1 audio files is bad" in result.output, result.output
    assert "silent.wav" in result.output


def test_an_output_directory_of_someone_elses_files_is_refused(invoke, tiny_base, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "metrics.json").write_text('{"their": "numbers"}')
    result = invoke("evaluate", "--model", tiny_base, "--data", DATA, "--out", out, "--quiet")
    assert result.exit_code == 1 and "did not write" in result.output
    assert json.loads((out / "metrics.json").read_text()) == {"their": "numbers"}
