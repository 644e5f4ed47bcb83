"""Run an experiment: for each variant convert (and fine-tune), save a checkpoint, reload it from disk, and
evaluate it on the same test data with the same settings; then write the comparison.

Resume: a variant is done when its ``metrics.json`` carries both of its current fingerprints (build: what makes
the checkpoint; evaluation: data, decoding, dtype); a checkpoint whose manifest carries the build fingerprint is
reused, so changing ``max_new_tokens`` re-evaluates every variant without re-converting any. Every file is
written atomically, so an interrupted run leaves only finished files behind. ``force=True`` recomputes all.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import checkpoint, data, distributed, lineage, model_refs
from .atomic import write_json
from .convert import convert_model
from .encoder_cache import EncoderOutputs, GiB
from .errors import ExperimentError
from .evaluate import evaluate
from .experiments import Experiment, Variant
from .finetune import FinetuneCaches
from .process_memory import limit_heap_growth, peak_rss_bytes

RESULTS = "results.json"


def _log(msg: str, quiet: bool) -> None:
    if not quiet and distributed.world().is_main:
        tqdm.write(msg)


def _done(vdir: Path, build: str, evaluation: str) -> dict[str, Any] | None:
    path = vdir / "metrics.json"
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    same = metrics.get("build_fingerprint") == build and metrics.get("eval_fingerprint") == evaluation
    return metrics if same else None


def _built(ckpt: Path) -> str | None:
    """The build fingerprint recorded in the checkpoint the runner wrote at ``ckpt`` (None: none there)."""
    if not checkpoint.is_checkpoint(ckpt):
        return None
    manifest = checkpoint.read_manifest(ckpt) or {}
    return ((manifest.get("provenance") or {}).get("experiment") or {}).get("build_fingerprint")


class _Variants:
    """Builds each variant's checkpoint (the state shared between variants: fine-tuning caches)."""

    def __init__(self, exp: Experiment, force: bool, quiet: bool):
        self.exp, self.force, self.quiet = exp, force, quiet
        self.finetune_caches = FinetuneCaches(int(exp.encoder_cache_gib * GiB), exp.run_dir / ".finetune-inputs")

    def checkpoint(self, v: Variant, vdir: Path, build: str) -> str:
        """The model reference to evaluate: an existing model, the base model, or this variant's checkpoint."""
        exp = self.exp
        if v.model:
            return v.model
        if not v.converted:
            return exp.base_model
        ckpt = vdir / "checkpoint"
        reuse = not self.force and _built(ckpt) == build
        if distributed.broadcast(reuse):  # every rank follows rank 0's view of the disk
            _log(f"[{v.name}] reusing {ckpt}", self.quiet)
            return str(ckpt)
        if not distributed.world().is_main and not v.finetune:
            distributed.barrier()  # rank 0 converts and saves; the others then load what it wrote
            return str(ckpt)
        # (with fine-tuning every rank converts the same way and trains its share of each batch; rank 0 saves)
        specs = ", ".join(s.short() for s in v.attention) or "no change"
        _log(f"[{v.name}] converting {exp.base_model}: {specs}", self.quiet)
        # checkpoints are built in float32 whatever the evaluation dtype: the build does not depend on it
        model, processor = model_refs.load(exp.base_model, device=exp.device)
        convert_model(model, processor, v.attention, exp.data.calibration_settings, source_model=exp.base_model,
                      quiet=self.quiet)
        if v.finetune:
            from .finetune import finetune

            lineage.record_finetune(model, finetune(model, processor, v.finetune, work_dir=vdir / "finetune",
                                                    teacher_ref=exp.base_model, quiet=self.quiet,
                                                    caches=self.finetune_caches))
        lineage.of(model).provenance.experiment = {"file": str(exp.path), "variant": v.name,
                                                   "build_fingerprint": build}
        if distributed.world().is_main:
            checkpoint.save(model, ckpt, processor, overwrite=True)  # the run directory is the runner's own
        del model
        gc.collect()
        distributed.barrier()
        return str(ckpt)


def load_test_data(exp: Experiment, quiet: bool) -> tuple[list, dict[str, Any]]:
    """The test utterances (every set, in order) and their description for the results."""
    utts = []
    for ref in exp.test_refs:  # lazily: ids and transcripts now, each file's audio when its batch is transcribed
        utts += data.load(ref, limit=exp.data.limit, quiet=quiet, lazy=True)
    if not utts:
        raise ExperimentError(f"{exp.path}: data.test gave no utterances")
    desc = {"ref": " + ".join(exp.test_refs), "sets": [data.describe(r) for r in exp.test_refs],
            "utterances": len(utts), "fingerprint": data.fingerprint_of(utts)}
    return utts, desc


def run(exp: Experiment, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run every variant of ``exp`` and write ``results.json`` and the reports under ``exp.run_dir``."""
    from . import plot, report

    run_dir = exp.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    world = distributed.world()
    _check_world(run_dir, world.size, force)
    t_start = time.perf_counter()
    limit_heap_growth()
    utts, data_desc = load_test_data(exp, quiet)
    base_processor = model_refs.load_processor(exp.base_model)
    shared = EncoderOutputs(int(exp.encoder_cache_gib * GiB), spill_dir=run_dir / ".encoder-outputs",
                            keep=exp.keep_encoder_cache)
    builder = _Variants(exp, force, quiet)
    try:
        entries = _run_variants(exp, builder, utts, data_desc, base_processor, shared, quiet)
    finally:
        shared.close()
        builder.finetune_caches.close()
    results = _write_results(exp, entries, data_desc)
    if not world.is_main:
        return results
    results["wall_seconds_this_invocation"] = time.perf_counter() - t_start
    results["encoder_reuse"] = shared.report()
    results["audio_hours"] = sum(u.duration for u in utts) / 3600
    results["peak_rss_bytes"] = peak_rss_bytes()
    png = plot.tradeoff_plot(run_dir)
    plot.curves_plot(run_dir)
    results["report"] = report.write_reports(run_dir)
    results["tradeoff_png"] = str(png) if png else None
    return results


def _run_variants(exp: Experiment, builder: _Variants, utts: list, data_desc: dict, base_processor,
                  shared: EncoderOutputs, quiet: bool) -> list[dict[str, Any]]:
    force = builder.force
    dtype = model_refs.parse_dtype(exp.dtype)
    entries = []
    for v in exp.variants:
        vdir = exp.run_dir / v.name
        build, evaluation = v.build_fingerprint(exp), v.eval_fingerprint(exp)
        metrics = distributed.broadcast(None if force else _done(vdir, build, evaluation))
        if metrics is not None:
            _log(f"[{v.name}] done earlier: WER {100 * metrics['wer']:.2f} % (not recomputed)", quiet)
        else:
            ref = builder.checkpoint(v, vdir, build)
            model = model_refs.load_model(ref, device=exp.device, dtype=dtype)  # always from disk
            processor = model_refs.load_processor(ref) if v.model else base_processor
            _log(f"[{v.name}] evaluating {ref} on {len(utts)} utterances", quiet)
            metrics = evaluate(model, processor, utts, exp.decoding, out_dir=vdir, encoder_outputs=shared,
                               quiet=quiet, extra={"variant": v.name, "build_fingerprint": build,
                                                   "eval_fingerprint": evaluation, "model": ref, "data": data_desc,
                                                   "dtype": exp.dtype or "float32", "device": exp.device})
            _log(f"[{v.name}] WER {100 * metrics['wer']:.2f} %", quiet)
            del model
            gc.collect()
        entries.append(_entry(v, vdir, metrics))
        _write_results(exp, entries, data_desc)
    return entries


def _entry(v: Variant, vdir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    valid_loss = None
    ckpt = vdir / "checkpoint"
    if checkpoint.is_checkpoint(ckpt):
        finetunes = (checkpoint.provenance_of(checkpoint.read_manifest(ckpt) or {})).finetunes
        valid_loss = finetunes[-1].get("best_valid_loss") if finetunes else None
    return {"name": v.name, "description": v.description, "source": metrics.get("model"),
            "attention": metrics.get("attention", {}), "finetuned": bool(v.finetune), "valid_loss": valid_loss,
            "dir": v.name, "metrics": metrics}


def _check_world(run_dir: Path, size: int, force: bool) -> None:
    """Refuse to mix results written by a different number of processes into this run (unless ``force``)."""
    path = run_dir / RESULTS
    if force or not path.exists():
        return
    try:
        before = json.loads(path.read_text()).get("world_size", 1)
    except json.JSONDecodeError:
        return
    if before != size:
        raise ExperimentError(
            f"{path} was written by a run with {before} process(es), this one has {size}: their timings are not "
            "comparable. Run with the same number of processes, or pass --force to recompute everything."
        )


def _write_results(exp: Experiment, entries: list[dict], data_desc: dict) -> dict[str, Any]:
    from dataclasses import asdict

    results = {"experiment": exp.name, "config_file": str(exp.path), "base_model": exp.base_model,
               "world_size": distributed.world().size, "baseline": exp.baseline,
               "data": {**{k: v for k, v in asdict(exp.data).items() if k != "test"}, "test": data_desc},
               "decoding": asdict(exp.decoding), "variants": entries}
    if distributed.world().is_main:
        write_json(exp.run_dir / RESULTS, results)
    return results
