"""Fine-tuning on a tiny random-weight Whisper: exactly the requested parameters change, every objective lowers
the validation loss, an interrupted run resumes to identical weights, the saved checkpoint reloads
token-identically, and config errors name the key."""

import copy
import json
import re

import pytest
import torch
from click.testing import CliRunner

from mla_registry import checkpoint, lineage, model_refs
from mla_registry import finetune as ft
from mla_registry.convert import convert_model
from mla_registry.errors import DataError, KwargError
from mla_registry.finetune import FinetuneConfig, distill_kl, finetune, topk_teacher

DATA = "builtin:real?source=librispeech_test_clean"  # 4 real clips: train and valid alike (a tiny overfit)


@pytest.fixture(scope="module")
def processor():
    return model_refs.load_processor("bundled:whisper-tiny.en")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model, processor):
    """The unconverted tiny model on disk (the distillation teacher) and in memory."""
    path = tmp_path_factory.mktemp("base") / "tiny"
    model = tiny_model()
    with torch.no_grad():  # a confident teacher (random weights give near-uniform logits and a KL of ~1e-5)
        model.model.decoder.layer_norm.weight.mul_(30)
    checkpoint.save(model, path, processor)
    return path, model


@pytest.fixture(scope="module")
def converted(base, processor):
    model = copy.deepcopy(base[1])
    convert_model(model, processor, ["decoder.*=mla:rank=16,init=svd"])
    return model


def cfg(**kw) -> FinetuneConfig:
    args = {"train": DATA, "valid": DATA, "objective": "ce", "steps": 2, "batch_size": 2, "lr": 1e-3,
            "warmup_steps": 0, "eval_every": 2, "patience": 0, "train_limit": 3, "valid_limit": 2}
    return FinetuneConfig(**{**args, **kw})


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


@pytest.mark.parametrize("mode", ["converted", "kv", "decoder", "all"])
def test_exactly_the_requested_parameters_change(tmp_path, converted, processor, mode):
    model = copy.deepcopy(converted)
    before = snapshot(model)
    prov = finetune(model, processor, cfg(trainable=mode, steps=1 if mode == "all" else 2, eval_every=1),
                    tmp_path / "work", teacher_ref=None, quiet=True)
    assert prov["best_step"] > 0  # improved, so trained weights were kept
    slots = tuple(r.path + "." for r in lineage.of(converted).slots)
    names = list(before)
    expected = {
        "converted": {n for n in names if n.startswith(slots)},
        "kv": {n for n in names if n.startswith(slots) and n.split(".")[-2] in ("kv_down", "k_up", "v_up")},
        "decoder": {n for n in names if n.startswith("model.decoder.")},
        "all": {n for n in names if n != "model.encoder.embed_positions.weight"},  # Whisper keeps it frozen
    }[mode]
    assert changed(before, model) == expected
    assert prov["encoder_cached"] == (mode != "all")
    assert all(p.requires_grad == converted.get_parameter(n).requires_grad for n, p in model.named_parameters())


@pytest.mark.parametrize("objective", ["ce", "distill", "ce+distill"])
def test_objectives_lower_the_validation_loss(tmp_path, base, converted, processor, objective):
    model = copy.deepcopy(converted)
    prov = finetune(model, processor, cfg(objective=objective, steps=4, eval_every=2), tmp_path / "w",
                    teacher_ref=str(base[0]), quiet=True)
    assert prov["best_valid_loss"] < prov["initial_valid_loss"]
    assert [c["step"] for c in prov["curve"]] == [0, 2, 4]
    assert (prov["teacher"] is None) == (objective == "ce")
    if objective != "ce":
        assert 0 < prov["teacher_topk_mass"] <= 1


def test_topk_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(5, 50) * 3, torch.randn(5, 50) * 3
    full = torch.nn.functional.kl_div(torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1),
                                      log_target=True, reduction="none").sum(-1)
    assert torch.allclose(distill_kl(s_logits, topk_teacher(t_logits, 50)), full, atol=1e-5)
    part = distill_kl(s_logits, topk_teacher(t_logits, 8))
    assert (part <= full + 1e-5).all() and (part >= 0).all()


def test_resume_after_interruption_gives_the_same_weights(tmp_path, converted, processor):
    c = cfg(steps=4, eval_every=2, warmup_steps=2)
    reference = copy.deepcopy(converted)
    prov_ref = finetune(reference, processor, c, tmp_path / "ref", teacher_ref=None, quiet=True)

    model = copy.deepcopy(converted)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(model, processor, c, tmp_path / "run", teacher_ref=None, quiet=True, on_step=interrupt)
    state = json.loads((tmp_path / "run" / ft.STATE_DIR / "state.json").read_text())
    assert state["step"] == 2 and not state["finished"]

    model = copy.deepcopy(converted)  # a fresh process would convert the base model again
    seen = []
    prov = finetune(model, processor, c, tmp_path / "run", teacher_ref=None, quiet=True,
                    on_step=lambda step, loss: seen.append(step))
    assert seen == [3, 4] and prov["resumed_from_step"] == 2
    assert prov["curve"] == prov_ref["curve"] and prov["best_step"] == prov_ref["best_step"]
    ref_params = dict(reference.named_parameters())
    assert all(torch.equal(p, ref_params[n]) for n, p in model.named_parameters())

    again = copy.deepcopy(converted)  # finished: not trained again, the best weights are loaded
    seen.clear()
    assert finetune(again, processor, c, tmp_path / "run", teacher_ref=None, quiet=True,
                    on_step=lambda step, loss: seen.append(step)) == prov
    assert not seen and all(torch.equal(p, ref_params[n]) for n, p in again.named_parameters())

    other = copy.deepcopy(converted)  # another configuration does not reuse the state
    prov2 = finetune(other, processor, cfg(steps=2, lr=2e-3), tmp_path / "run", teacher_ref=None, quiet=True)
    assert prov2["resumed_from_step"] is None and prov2["steps_done"] == 2


def test_saved_checkpoint_reloads_token_identically(tmp_path, base, converted, processor):
    from mla_registry import data, whisper

    model = copy.deepcopy(converted)
    prov = finetune(model, processor, cfg(objective="distill", steps=2), tmp_path / "w",
                    teacher_ref=str(base[0]), quiet=True)
    lineage.record_finetune(model, prov)
    checkpoint.save(model, tmp_path / "ckpt", processor)
    loaded = checkpoint.load(tmp_path / "ckpt")
    manifest = checkpoint.read_manifest(tmp_path / "ckpt")
    assert manifest["provenance"]["finetunes"][-1]["best_valid_loss"] == prov["best_valid_loss"]
    assert lineage.of(loaded).provenance.finetune["best_valid_loss"] == prov["best_valid_loss"]
    feats = whisper.input_features(processor, [u.audio for u in data.load(DATA, limit=2, quiet=True)])
    with torch.no_grad():
        a = model.generate(input_features=feats, max_new_tokens=8)
        b = loaded.generate(input_features=feats, max_new_tokens=8)
    assert torch.equal(a, b)


def test_cli_keeps_provenance_and_defaults_the_teacher(tmp_path, base, converted, processor):
    from mla_registry.cli.finetune import command

    src = tmp_path / "mla16"
    model = copy.deepcopy(converted)
    lineage.of(model).provenance.source_model = str(base[0])  # as convert_and_save records it
    checkpoint.save(model, src, processor)
    out = tmp_path / "ft"
    result = CliRunner().invoke(command, ["--model", str(src), "--train", DATA, "--valid", DATA, "--out", str(out),
                                          "--steps", "2", "--batch-size", "2", "--eval-every", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    prov = checkpoint.read_manifest(out)["provenance"]
    assert prov["source_model"] == str(base[0])
    assert [c["attention_specs"] for c in prov["conversions"]] == [["decoder.*=mla:rank=16,init=svd"]]
    assert prov["finetunes"][-1]["teacher"] == str(base[0])
    assert prov["finetunes"][-1]["config"]["objective"] == "distill"
    assert (tmp_path / "ft.work" / ft.STATE_DIR / "state.json").exists()
    help_text = CliRunner().invoke(command, ["--help"]).output
    assert "mla-registry finetune --model" in help_text and "--distill-topk" in help_text  # generated options
    from mla_registry.cli.main import cli

    again = CliRunner().invoke(cli, ["finetune", "--model", str(src), "--train", DATA, "--valid", DATA, "--out",
                                     str(out), "--steps", "2", "--quiet"])
    assert again.exit_code != 0 and "--overwrite" in again.output  # the first fine-tune is not replaced silently
    bad = CliRunner().invoke(cli, ["finetune", "--model", str(src), "--train", DATA, "--valid", DATA, "--out",
                                   str(tmp_path / "x"), "--lr", "0"])
    assert bad.exit_code != 0 and "lr" in bad.output and "Traceback" not in bad.output


def test_config_from_mapping_and_errors_name_the_key():
    c = FinetuneConfig.from_mapping({"lr": "3e-4", "steps": 10}, defaults={"train": "builtin:tts-train",
                                                                          "valid": "builtin:tts-valid"})
    assert (c.lr, c.steps, c.train, c.valid, c.objective) == (3e-4, 10, "builtin:tts-train", "builtin:tts-valid",
                                                               "distill")
    cases = [({"objectiv": "ce"}, "finetune.objectiv: unknown key 'objectiv'"),
             ({"objective": "mse"}, "finetune.objective: 'mse' is not allowed; allowed values: ce, distill, "
                                    "ce+distill"),
             ({"trainable": "q"}, "allowed values: converted, kv, attention, decoder, all"),
             ({"steps": 1.5}, "finetune.steps: must be an integer"),
             ({"steps": True}, "finetune.steps: must be an integer"),
             ({"lr": 0}, "finetune.lr: 0.0: must be > 0"),
             ({"patience": -1}, "finetune.patience: -1: must be at least 0")]
    for block, message in cases:
        with pytest.raises(KwargError, match=re.escape(message)):
            FinetuneConfig.from_mapping(block, defaults={"train": "a", "valid": "b"})
    with pytest.raises(KwargError, match=r"finetune.train: is missing: set data.train .* or finetune.train"):
        FinetuneConfig.from_mapping({"valid": "b"}, defaults={})
    with pytest.raises(KwargError, match="finetune must be a mapping"):
        FinetuneConfig.from_mapping(["lr"], defaults={})


def test_trainable_kv_uses_the_groups_the_plugin_declares(converted, monkeypatch):
    from mla_registry.plugins.mla import MlaBuilder

    names = set(ft.trainable_parameters(converted, "kv"))
    assert names and all(n.split(".")[-2] in ("kv_down", "k_up", "v_up") for n in names)
    monkeypatch.setattr(MlaBuilder, "parameter_groups", {"query": ("q_proj.",)})
    with pytest.raises(KwargError, match="plugin 'mla'.*declares no 'kv' parameter group"):
        ft.trainable_parameters(converted, "kv")


def test_nothing_to_train_is_a_clear_error(tmp_path, base, processor):
    with pytest.raises(ft.FinetuneError, match="no converted attention slot"):
        finetune(copy.deepcopy(base[1]), processor, cfg(), tmp_path / "w", teacher_ref=None, quiet=True)


def test_experiments_yaml_validates_the_finetune_block(tmp_path):
    from mla_registry import experiments
    from mla_registry.errors import ExperimentError

    text = f"""\
name: ft
output_dir: {tmp_path / 'runs'}
data:
  test: "{DATA}"
variants:
  - name: ok
    attention: {{decoder.self: "mla:rank=16,init=svd"}}
    finetune: {{train: "{DATA}", valid: "{DATA}", trainable: kv}}
  - name: bad
    attention: {{decoder.self: "mla:rank=16,init=svd"}}
    finetune: {{objective: mse}}
"""
    (tmp_path / "exp.yaml").write_text(text)
    with pytest.raises(ExperimentError) as info:
        experiments.load(tmp_path / "exp.yaml", check_data=False)
    message = str(info.value)
    assert "exp.yaml:11: variants[1].finetune" in message and "'mse' is not allowed" in message
    assert "finetune.train: is missing: set data.train" in message and "variants[0]" not in message


def test_cached_inputs_beyond_the_budget_go_to_disk_with_identical_training(tmp_path, converted, processor):
    c = cfg(steps=2, eval_every=1)
    in_memory = copy.deepcopy(converted)
    finetune(in_memory, processor, c, tmp_path / "a", teacher_ref=None, quiet=True)
    on_disk = copy.deepcopy(converted)
    caches = ft.FinetuneCaches(budget_bytes=0, directory=tmp_path / "inputs")
    finetune(on_disk, processor, c, tmp_path / "b", teacher_ref=None, quiet=True, caches=caches)
    report = caches.store.report()
    assert report["in_memory"] == 0 and report["on_disk"] == 3 + 2  # train_limit 3, valid_limit 2
    a, b = dict(in_memory.named_parameters()), dict(on_disk.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    caches.close()
    assert not (tmp_path / "inputs").exists()


def test_the_validation_set_comes_from_the_runs_encoder_outputs(tmp_path, converted, processor, monkeypatch):
    """In a run the validation CE has already encoded the validation set: the fine-tune takes those outputs
    (and those of training batches that begin the same dataset) and trains to the same weights."""
    from mla_registry import data
    from mla_registry.encoder_cache import EncoderOutputs
    from mla_registry.finetune import loop

    c = cfg(steps=2, eval_every=1)
    alone = copy.deepcopy(converted)
    finetune(alone, processor, c, tmp_path / "a", teacher_ref=None, quiet=True)
    shared = EncoderOutputs()
    ft.validation_ce(converted, processor, data.load(DATA, quiet=True)[:2], 2, shared, quiet=True)  # valid_limit 2
    encoded = []
    real_encode = loop.whisper.encode
    monkeypatch.setattr(loop.whisper, "encode", lambda m, f: encoded.append(f.shape[0]) or real_encode(m, f))
    in_run = copy.deepcopy(converted)
    caches = ft.FinetuneCaches(encoder_outputs=shared, outputs_batch_size=2)
    finetune(in_run, processor, c, tmp_path / "b", teacher_ref=None, quiet=True, caches=caches)
    # train and valid are both taken from the start of DATA: the validation batch (2 clips) is also the training
    # set's first, so of train_limit 3 only the third clip is encoded; two batches looked up
    assert sum(encoded) == 1 and shared.hits == 2
    a, b = dict(alone.named_parameters()), dict(in_run.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    caches.close()


# --- the validation CE a run reports for every variant ---------------------------------------------------------

def test_validation_ce_is_the_fine_tunes_cross_entropy(tmp_path, converted, processor, reference_ce):
    from mla_registry import data
    from mla_registry.encoder_cache import EncoderOutputs

    utts = data.load(DATA, quiet=True)  # 4 clips: batches of 3 + 1, so weighting by tokens matters
    out = ft.validation_ce(converted, processor, utts, batch_size=3, quiet=True)
    assert (out["utterances"], out["tokens"] > 4 * 5) == (4, True)
    assert out["ce"] == pytest.approx(reference_ce(converted, processor, utts), rel=1e-5)
    shared = EncoderOutputs()
    for _ in range(2):  # shared encoder outputs: the same figure, the encoder run once per batch
        assert ft.validation_ce(converted, processor, utts, 3, shared, quiet=True)["ce"] == \
            pytest.approx(out["ce"], rel=1e-6)
    assert (shared.misses, shared.hits) == (2, 2)
    # the fine-tune's validation loss under objective ce is this same quantity (its step-0 value)
    prov = finetune(copy.deepcopy(converted), processor, cfg(steps=1), tmp_path / "w", teacher_ref=None, quiet=True)
    assert prov["initial_valid_loss"] == pytest.approx(ft.validation_ce(converted, processor, utts[:2])["ce"],
                                                       rel=1e-5)
    utts[1].text = " "
    with pytest.raises(DataError, match="needs a transcript for every validation utterance"):
        ft.validation_ce(converted, processor, utts, quiet=True)


def test_validation_ce_separates_a_broken_conversion():
    """On the real model and real speech: mean-pooled GQA-2 (untrained, WER near 100 %) is far from the stock
    model's cross entropy. (The stock figure is over 1 nat because LibriSpeech transcripts are upper case without
    punctuation: the CE scores the transcript's own tokens, not the normalised words WER compares.)"""
    from mla_registry import data
    from mla_registry.encoder_cache import EncoderOutputs

    model, proc = model_refs.load("bundled:whisper-tiny.en")
    utts = data.load(DATA, quiet=True)
    shared = EncoderOutputs()  # only the decoder is converted: one encoder pass serves both
    stock = ft.validation_ce(model, proc, utts, encoder_outputs=shared, quiet=True)["ce"]
    convert_model(model, proc, ["decoder.*=gqa:kv_heads=2"])
    broken = ft.validation_ce(model, proc, utts, encoder_outputs=shared, quiet=True)["ce"]
    assert shared.hits == shared.misses == 1
    assert stock < 2.0 and broken > stock + 4.0, (stock, broken)
