"""experiments.yaml: a validated schema, and the runner that takes every variant through the same evaluation.

Every error names the file, the line and the key path, and says what would be right. Validation covers the
whole file (plugins, kwargs, slot selectors, dataset references) before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import surgery
from .errors import ExperimentError, MlaRegistryError
from .evaluate import DecodeSettings
from .models import DEFAULT_MODEL

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

TOP_KEYS = {"name": str, "output_dir": str, "base_model": str, "baseline": str, "device": str, "dtype": str,
            "data": dict, "decoding": dict, "variants": list}
DATA_KEYS = {"test": (str, list), "calibration": str, "train": str, "valid": str, "limit": int}
DECODING_KEYS = {"batch_size": int, "num_beams": int, "max_new_tokens": int}
VARIANT_KEYS = {"name": str, "model": str, "attention": dict, "finetune": dict, "description": str}


@dataclass
class Variant:
    """One row of the comparison: a base model converted with ``attention`` (and fine-tuned), or an existing
    checkpoint / model reference given as ``model``."""

    name: str
    attention: list[surgery.AttentionSpec] = field(default_factory=list)
    model: str | None = None
    finetune: dict[str, Any] | None = None
    description: str = ""

    def fingerprint(self, experiment: Experiment) -> str:
        """Changes whenever anything that shapes this variant's result changes (resume compares it)."""
        blob = {
            "variant": {"name": self.name, "model": self.model, "finetune": self.finetune,
                        "attention": [s.short() for s in self.attention]},
            "base_model": experiment.base_model, "data": experiment.data, "decoding": asdict(experiment.decoding),
            "dtype": experiment.dtype,
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Experiment:
    path: Path
    name: str
    base_model: str
    data: dict[str, Any]
    decoding: DecodeSettings
    variants: list[Variant]
    output_dir: Path
    baseline: str | None
    device: str = "cpu"
    dtype: str | None = None

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    @property
    def test_refs(self) -> list[str]:
        test = self.data["test"]
        return [test] if isinstance(test, str) else list(test)


# --- YAML with line numbers ---------------------------------------------------------------------------------

def _lines(node: yaml.Node, path: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Map each key path (``variants[2].attention``) to the 1-based line where it appears."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            sub = f"{path}.{k.value}" if path else str(k.value)
            out[sub] = k.start_mark.line + 1
            _lines(v, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, f"{path}[{i}]", out)
    return out


class _Checker:
    """Collects errors as ``file:line: key.path: message`` so one run reports all of them."""

    def __init__(self, path: Path, lines: dict[str, int]):
        self.path, self.lines, self.errors = path, lines, []

    def err(self, key: str, message: str) -> None:
        line = self.lines.get(key)
        while line is None and key:
            key = key.rpartition(".")[0] if "." in key else ""
            line = self.lines.get(key)
        self.errors.append(f"{self.path}:{line or 1}: {key or '(top level)'}: {message}")

    def keys(self, mapping: dict, allowed: dict[str, Any], where: str) -> None:
        for k, v in mapping.items():
            key = f"{where}.{k}" if where else str(k)
            if k not in allowed:
                self.err(key, f"unknown key '{k}'; allowed: {', '.join(allowed)}")
            elif not isinstance(v, allowed[k]) or (allowed[k] is int and isinstance(v, bool)):
                want = allowed[k] if isinstance(allowed[k], tuple) else (allowed[k],)
                self.err(key, f"must be {' or '.join(t.__name__ for t in want)}, got {type(v).__name__} {v!r}")


def load(path: str | Path, check_data: bool = True) -> Experiment:
    """Read and validate ``path``; raise :class:`ExperimentError` listing every problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExperimentError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}:1: the file must be a mapping with 'variants' (see experiments.yaml)")
    c = _Checker(path, _lines(node) if node is not None else {})
    c.keys(raw, TOP_KEYS, "")
    if "variants" not in raw:
        c.err("", "'variants' is required: a list of {name, attention} entries")
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    c.keys(data, DATA_KEYS, "data")
    if "test" not in data:
        c.err("data", "'data.test' is required: the test set reference(s), e.g. builtin:tts-test")
    decoding = raw.get("decoding") if isinstance(raw.get("decoding"), dict) else {}
    c.keys(decoding, DECODING_KEYS, "decoding")
    for k, v in decoding.items():
        if k in DECODING_KEYS and isinstance(v, int) and v < 1:
            c.err(f"decoding.{k}", f"must be at least 1, got {v}")
    name = raw.get("name", path.stem)
    if isinstance(name, str) and not _NAME.match(name):
        c.err("name", f"'{name}' must be a plain directory name (letters, digits, . _ -)")
    base_model = raw.get("base_model", DEFAULT_MODEL)

    variants = _variants(c, raw.get("variants") if isinstance(raw.get("variants"), list) else [], data)
    names = [v.name for v in variants]
    baseline = raw.get("baseline", names[0] if names else None)
    if isinstance(baseline, str) and names and baseline not in names:
        c.err("baseline", f"'{baseline}' is not a variant name; variants: {', '.join(names)}")
    if not c.errors and check_data:
        _check_data(c, data)
        _check_slots(c, base_model, variants)
    if c.errors:
        raise ExperimentError(f"{len(c.errors)} problem(s) in {path}:\n  " + "\n  ".join(c.errors))
    out_dir = Path(raw.get("output_dir", "runs"))
    if not out_dir.is_absolute():
        out_dir = (Path.cwd() / out_dir)
    return Experiment(path=path, name=name, base_model=base_model, data=data,
                      decoding=DecodeSettings(**decoding), variants=variants, output_dir=out_dir,
                      baseline=baseline, device=raw.get("device", "cpu"), dtype=raw.get("dtype"))


def _variants(c: _Checker, items: list, data: dict) -> list[Variant]:
    from .registry import get_builder

    out: list[Variant] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"variants[{i}]"
        if not isinstance(item, dict):
            c.err(where, "each variant must be a mapping with 'name' and 'attention' (or 'model')")
            continue
        c.keys(item, VARIANT_KEYS, where)
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            c.err(f"{where}.name", "required: a plain name (letters, digits, . _ -) used as a directory")
            continue
        if name in seen:
            c.err(f"{where}.name", f"duplicate variant name '{name}' (also variants[{seen[name]}]); rename one")
        seen[name] = i
        if "model" in item and item.get("attention"):
            c.err(where, "give either 'model' (an existing checkpoint) or 'attention', not both")
        specs: list[surgery.AttentionSpec] = []
        for sel, value in (item.get("attention") or {}).items():
            key = f"{where}.attention.{sel}"
            try:
                spec = surgery.spec_from_mapping(str(sel), value)
                builder = get_builder(spec.plugin)
                if "calibration" in {k.name for k in builder.kwargs} and "calibration" not in spec.kwargs \
                        and data.get("calibration"):
                    spec.kwargs["calibration"] = data["calibration"]
                builder.validate(spec.kwargs, where=f"attention '{sel}'")
                specs.append(spec)
            except MlaRegistryError as exc:
                c.err(key, str(exc))
        if item.get("finetune") is not None:
            _check_finetune(c, f"{where}.finetune", item["finetune"], data)
        out.append(Variant(name=name, attention=specs, model=item.get("model"), finetune=item.get("finetune"),
                           description=item.get("description", "")))
    return out


def _check_finetune(c: _Checker, where: str, block: dict, data: dict) -> None:
    try:
        from .finetune import FinetuneConfig
    except ImportError:
        c.err(where, "fine-tuning is not available in this version of mla-registry")
        return
    try:
        FinetuneConfig.from_mapping(block, defaults=data)
    except MlaRegistryError as exc:
        c.err(where, str(exc))


def _check_data(c: _Checker, data: dict) -> None:
    from . import data as datasets

    refs = [("data.test", r) for r in ([data["test"]] if isinstance(data["test"], str) else data["test"])]
    refs += [(f"data.{k}", data[k]) for k in ("calibration", "train", "valid") if k in data]
    for key, ref in refs:
        try:
            datasets.describe(ref)
        except MlaRegistryError as exc:
            c.err(key, f"dataset '{ref}' is not readable: {exc}")


def _check_slots(c: _Checker, base_model: str, variants: list[Variant]) -> None:
    """Selectors must match slots of the base model (its config is enough: built on the meta device)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from .families import whisper
    from .models import resolve

    if not any(v.attention for v in variants):
        return
    try:
        with torch.device("meta"):
            model = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(resolve(base_model)))
    except (MlaRegistryError, OSError) as exc:
        c.err("base_model", f"cannot read the config of '{base_model}': {exc}")
        return
    slots = whisper.slots(model)
    for i, v in enumerate(variants):
        for spec in v.attention:
            try:
                chosen = surgery.select(slots, spec.selector)
                builder = surgery.get_builder(spec.plugin)
                kwargs = builder.validate(spec.kwargs)
                for slot in chosen:
                    builder.check_slot(slot, kwargs)
            except MlaRegistryError as exc:
                c.err(f"variants[{i}].attention.{spec.selector}", str(exc))
