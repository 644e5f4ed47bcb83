"""experiments.yaml: read safely, validated as a whole, turned into an :class:`Experiment`.

Every error names the file, the line and the key path, and says what would be right; validation covers the
whole file (schema, plugins, kwargs, slot selectors on the base model's config, decoding limits, devices,
dataset references) before any work starts, so ``mla-registry run --check`` rejects what a run would reject.
Each section is one dataclass (:mod:`mla_registry.config`): ``data`` is :class:`DataConfig`, ``decoding`` is
:class:`~mla_registry.evaluate.DecodeSettings`, a variant's ``finetune`` is
:class:`~mla_registry.finetune.FinetuneConfig`, the top-level scalars are :class:`RunSettings`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import fingerprint, surgery
from .calibration import DEFAULT_CALIBRATION, DEFAULT_CALIBRATION_SIZE, CalibrationSettings
from .config import at_least, problems, setting
from .errors import ExperimentError, MlaRegistryError
from .evaluate import DecodeSettings
from .model_refs import DEFAULT_MODEL, DTYPES, device_problem

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NODES = 100_000  # YAML nodes after alias expansion: an experiments file has hundreds
MAX_BYTES = 4 << 20


def _plain_name(v: str) -> str | None:
    return None if _NAME.match(v) else "must be a plain directory name (letters, digits, . _ -)"


def _device(v: str) -> str | None:
    return device_problem(v)


@dataclass(frozen=True)
class RunSettings:
    """The top-level scalar keys of an experiments file."""

    name: str | None = setting(None, "the run's directory name under output_dir (default: the file's stem)",
                               check=_plain_name)
    output_dir: str = setting("runs", "where runs/<name>/ is written (relative to the working directory)")
    base_model: str = setting(DEFAULT_MODEL, "the model every variant is converted from")
    baseline: str | None = setting(None, "the variant ΔWER is measured against (default: the first)")
    device: str = setting("cpu", "torch device: cpu, cuda, cuda:N", check=_device)
    dtype: str | None = setting(None, "evaluation dtype: float32 (default), bfloat16 or float16", choices=DTYPES)
    encoder_cache_gib: float = setting(2.0, "memory for encoder outputs shared between variants; beyond it they go "
                                       "to a disk cache in the run directory, or are recomputed",
                                       check=at_least(0))
    keep_encoder_cache: bool = setting(False, "keep the disk cache of encoder outputs after the run")


@dataclass(frozen=True)
class DataConfig:
    """``data:``: the test set(s), the conversion's calibration audio, fine-tuning data."""

    test: str | list[str] = setting(help="the test set reference(s), e.g. builtin:tts-test")
    calibration: str = setting(DEFAULT_CALIBRATION, "calibration audio of activation-aware conversions (never "
                               "the test audio)")
    calibration_size: int = setting(DEFAULT_CALIBRATION_SIZE, "calibration utterances", check=at_least(1))
    train: str | None = setting(None, "fine-tuning data (default of every variant's finetune.train)")
    valid: str | None = setting(None, "validation data (default of every variant's finetune.valid)")
    limit: int | None = setting(None, "only the first N utterances of each test set", check=at_least(1))

    @property
    def test_refs(self) -> list[str]:
        return [self.test] if isinstance(self.test, str) else list(self.test)

    @property
    def calibration_settings(self) -> CalibrationSettings:
        return CalibrationSettings(self.calibration, self.calibration_size)


VARIANT_KEYS = ("name", "model", "attention", "finetune", "description")


@dataclass
class Variant:
    """One row of the comparison: the base model converted with ``attention`` (and fine-tuned), or an existing
    checkpoint / model reference given as ``model``."""

    name: str
    attention: list[surgery.AttentionSpec] = field(default_factory=list)
    model: str | None = None
    finetune: Any = None  # a FinetuneConfig (train/valid resolved against data:)
    description: str = ""

    @property
    def converted(self) -> bool:
        return bool(self.attention or self.finetune)

    def build_fingerprint(self, experiment: Experiment) -> str:
        """What builds this variant's checkpoint: base model, attention, fine-tuning (with its data), and the
        calibration audio. Changing decoding or test data never re-converts."""
        blob = {"base_model": experiment.base_model, "model": self.model,
                "attention": [s.short() for s in self.attention],
                "finetune": asdict(self.finetune) if self.finetune else None,
                "calibration": asdict(experiment.data.calibration_settings) if self.attention else None}
        return fingerprint.of_json(blob)[:16]

    def eval_fingerprint(self, experiment: Experiment) -> str:
        """What evaluates it: test data, decoding, dtype."""
        blob = {"test": experiment.data.test_refs, "limit": experiment.data.limit,
                "decoding": asdict(experiment.decoding), "dtype": experiment.dtype}
        return fingerprint.of_json(blob)[:16]


@dataclass
class Experiment:
    path: Path
    name: str
    base_model: str
    data: DataConfig
    decoding: DecodeSettings
    variants: list[Variant]
    output_dir: Path
    baseline: str | None
    device: str = "cpu"
    dtype: str | None = None
    encoder_cache_gib: float = 2.0
    keep_encoder_cache: bool = False

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    @property
    def test_refs(self) -> list[str]:
        return self.data.test_refs


# --- reading YAML safely, with line numbers -----------------------------------------------------------------

def _read_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """The document and a map of key paths (``variants[2].attention``) to 1-based lines. Refuses what is not
    UTF-8 YAML text, a document nested too deeply for the parser, one that expands to more than
    :data:`MAX_NODES` nodes (an alias bomb), and duplicate keys (YAML lets the last one silently win)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExperimentError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ExperimentError(f"{path}: {len(data)} bytes; an experiments file is at most {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ExperimentError(f"{path}: not UTF-8 text (byte {exc.start}); is this a YAML file?") from None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters here, before any parsing
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{path}: not valid YAML: {exc}") from None
    try:
        node = loader.get_single_node()
        lines = _lines(path, node)
        raw = loader.construct_document(node) if node is not None else None
    except RecursionError:
        raise ExperimentError(f"{path}: nested too deeply to parse") from None
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    return raw, lines


def _lines(path: Path, root: yaml.Node | None) -> dict[str, int]:
    """Key path -> line, walking the node graph once per (node, path) with alias expansion bounded; duplicate
    keys of a mapping are an error naming both lines. Iterative: no recursion limit to hit."""
    out: dict[str, int] = {}
    if root is None:
        return out
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    visits = 0
    while stack:
        node, key = stack.pop()
        visits += 1
        if visits > MAX_NODES:
            raise ExperimentError(f"{path}: expands to more than {MAX_NODES} YAML nodes (aliases inside aliases?); "
                                  "an experiments file needs a few hundred")
        out.setdefault(key, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                name = str(k.value)
                if name == "<<":  # a merge key: its entries may be overridden by explicit keys
                    stack.append((v, key))
                    continue
                line = k.start_mark.line + 1
                sub = f"{key}.{name}" if key else name
                if name in seen:
                    raise ExperimentError(f"{path}:{line}: {sub}: duplicate key '{name}' (first at line "
                                          f"{seen[name]}); YAML would keep only the last one")
                seen[name] = line
                out[sub] = line
                stack.append((v, sub))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, f"{key}[{i}]") for i, v in enumerate(node.value))
    return out


class _Checker:
    """Collects errors as ``file:line: key.path: message`` so one run reports all of them."""

    def __init__(self, path: Path, lines: dict[str, int]):
        self.path, self.lines, self.errors = path, lines, []

    def err(self, key: str, message: str) -> None:
        """Record ``message`` about ``key``, at the line of the key or (a missing key) of its nearest parent."""
        line, parent = self.lines.get(key), key
        while line is None and parent:
            parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", parent) if re.search(r"[.\[]", parent) else ""
            line = self.lines.get(parent)
        self.errors.append(f"{self.path}:{line or 1}: {key or '(top level)'}: {message}")

    def section(self, cls: type, mapping: Any, where: str) -> dict[str, Any]:
        """Check one section against its dataclass; returns the valid part."""
        if mapping is None:
            return {}
        if not isinstance(mapping, dict):
            self.err(where, f"must be a mapping, got {type(mapping).__name__}")
            return {}
        bad = set()
        for key, message in problems(cls, mapping):
            self.err(f"{where}.{key}" if where else key, message)
            bad.add(key)
        return {k: v for k, v in mapping.items() if k not in bad}


def load(path: str | Path, check_data: bool = True) -> Experiment:
    """Read and validate ``path``; raise :class:`ExperimentError` listing every problem found. With
    ``check_data=False`` dataset references are not opened (the base model's config still is: selectors and
    kwargs are checked against its slots)."""
    path = Path(path)
    raw, lines = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}:1: the file must be a mapping with 'data' and 'variants' "
                              "(see experiments.yaml)")
    c = _Checker(path, lines)
    top = {k: v for k, v in raw.items() if k not in ("data", "decoding", "variants")}
    settings = RunSettings(**c.section(RunSettings, top, ""))
    data_raw = raw.get("data")
    data_ok = c.section(DataConfig, data_raw, "data")
    if not isinstance(data_raw, dict) or "test" not in data_raw:
        c.err("data", "'data.test' is required: the test set reference(s), e.g. builtin:tts-test")
    decoding = DecodeSettings(**c.section(DecodeSettings, raw.get("decoding"), "decoding"))
    items = raw.get("variants")
    if "variants" not in raw:
        c.err("", "'variants' is required: a list of {name, attention} entries")
    elif not isinstance(items, list) or not items:
        c.err("variants", "must be a non-empty list of {name, attention} entries")
        items = []
    data = DataConfig(**data_ok) if "test" in data_ok else None
    variants = _variants(c, items or [], data_ok)
    names = [v.name for v in variants]
    baseline = settings.baseline or (names[0] if names else None)
    if settings.baseline and names and settings.baseline not in names:
        c.err("baseline", f"'{settings.baseline}' is not a variant name; variants: {', '.join(names)}")
    _check_model(c, settings.base_model, variants, decoding)  # every variant's kwargs and selectors, once
    if check_data and data is not None:
        _check_data(c, data)
    if c.errors:
        raise ExperimentError(f"{len(c.errors)} problem(s) in {path}:\n  " + "\n  ".join(c.errors))
    out_dir = Path(settings.output_dir)
    if not out_dir.is_absolute():
        out_dir = Path.cwd() / out_dir
    return Experiment(path=path, name=settings.name or path.stem, base_model=settings.base_model, data=data,
                      decoding=decoding, variants=variants, output_dir=out_dir, baseline=baseline,
                      device=settings.device, dtype=settings.dtype, encoder_cache_gib=settings.encoder_cache_gib,
                      keep_encoder_cache=settings.keep_encoder_cache)


def _variants(c: _Checker, items: list, data: dict[str, Any]) -> list[Variant]:
    from .finetune import FinetuneConfig

    out: list[Variant] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"variants[{i}]"
        if not isinstance(item, dict):
            c.err(where, "each variant must be a mapping with 'name' and 'attention' (or 'model')")
            continue
        for k in item:
            if k not in VARIANT_KEYS:
                c.err(f"{where}.{k}", f"unknown key '{k}'; allowed: {', '.join(VARIANT_KEYS)}")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            c.err(f"{where}.name", "required: a plain name (letters, digits, . _ -) used as a directory")
            continue
        if name in seen:
            c.err(f"{where}.name", f"duplicate variant name '{name}' (also variants[{seen[name]}]); rename one")
        seen[name] = i
        for key, kind in (("model", str), ("description", str), ("attention", dict), ("finetune", dict)):
            if item.get(key) is not None and not isinstance(item[key], kind):
                c.err(f"{where}.{key}", f"must be {'a string' if kind is str else 'a mapping'}, got "
                                        f"{type(item[key]).__name__}")
        if item.get("model") and item.get("attention"):
            c.err(where, "give either 'model' (an existing checkpoint) or 'attention', not both")
        specs: list[surgery.AttentionSpec] = []
        attention = item.get("attention") if isinstance(item.get("attention"), dict) else {}
        for sel, value in attention.items():
            try:
                specs.append(surgery.spec_from_mapping(str(sel), value))
            except MlaRegistryError as exc:
                c.err(f"{where}.attention.{sel}", str(exc))
        ft = None
        if isinstance(item.get("finetune"), dict):
            try:
                ft = FinetuneConfig.from_mapping(item["finetune"], defaults=data)
            except MlaRegistryError as exc:
                c.err(f"{where}.finetune", str(exc))
        out.append(Variant(name=name, attention=specs, model=item.get("model"), finetune=ft,
                           description=str(item.get("description") or "")))
    return out


def _check_data(c: _Checker, data: DataConfig) -> None:
    from . import data as datasets

    refs = [("data.test", r) for r in data.test_refs]
    refs += [(f"data.{k}", getattr(data, k)) for k in ("calibration", "train", "valid") if getattr(data, k)]
    for key, ref in refs:
        try:
            datasets.describe(ref)
        except MlaRegistryError as exc:
            c.err(key, f"dataset '{ref}' is not readable: {exc}")


def _check_model(c: _Checker, base_model: str, variants: list[Variant], decoding: DecodeSettings) -> None:
    """Selectors and kwargs must fit the base model's slots, and decoding its decoder (its config is enough: the
    model is built on the meta device, no weights are read). Every variant's kwargs are validated here, once."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    from .checkpoint_files import read_config
    from .model_refs import resolve

    try:
        where = resolve(base_model)
        # a local directory's config.json is checked (dimensions, heads) before a model is built from it
        config = read_config(Path(where)) if Path(where).is_dir() else WhisperConfig.from_pretrained(where)
        with torch.device("meta"):
            model = WhisperForConditionalGeneration(config)
        if Path(where).is_dir() and (Path(where) / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(where)
    except (MlaRegistryError, OSError, ValueError) as exc:
        c.err("base_model", f"cannot read the config of '{base_model}': {exc}")
        return
    try:
        decoding.check_model(model)
    except MlaRegistryError as exc:  # its message starts with the setting at fault: decoding.language=...
        key = re.match(r"(decoding\.\w+)", str(exc))
        c.err(key[1] if key else "decoding", str(exc))
    for i, v in enumerate(variants):
        for spec in v.attention:
            try:
                surgery.plan(model, [spec])
            except MlaRegistryError as exc:
                c.err(f"variants[{i}].attention.{spec.selector}", str(exc))
