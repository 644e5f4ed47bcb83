"""Run an experiment: for each variant convert (and fine-tune), save a checkpoint, reload it from disk, and
evaluate it on the same test data with the same settings; then write the comparison.

Resume: a variant whose ``metrics.json`` carries the variant's current fingerprint is done and is not
recomputed; a checkpoint whose manifest carries it is reused. Every file is written atomically, so an interrupted
run leaves only finished files behind. ``force=True`` recomputes everything.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import checkpoint, data, distributed, models
from .cache import write_json_atomic
from .convert import convert_model
from .errors import ExperimentError
from .evaluate import EncoderOutputs, evaluate
from .experiments import Experiment, Variant

RESULTS = "results.json"


def _log(msg: str, quiet: bool) -> None:
    if not quiet and distributed.world().is_main:
        tqdm.write(msg)


def _done(vdir: Path, fingerprint: str) -> dict[str, Any] | None:
    path = vdir / "metrics.json"
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return metrics if metrics.get("variant_fingerprint") == fingerprint else None


def _checkpoint(exp: Experiment, v: Variant, vdir: Path, fingerprint: str, force: bool, quiet: bool) -> str:
    """The model reference to evaluate: an existing model, the base model, or this variant's saved checkpoint."""
    if v.model:
        return v.model
    if not v.attention and not v.finetune:
        return exp.base_model
    ckpt = vdir / "checkpoint"
    manifest = checkpoint.read_manifest(ckpt) if (ckpt / checkpoint.MANIFEST).exists() else None
    reuse = not force and bool(manifest) and manifest.get("provenance", {}).get("variant_fingerprint") == fingerprint
    if distributed.broadcast(reuse):  # every rank follows rank 0's view of the disk
        _log(f"[{v.name}] reusing {ckpt}", quiet)
        return str(ckpt)
    if not distributed.world().is_main and not v.finetune:
        distributed.barrier()  # rank 0 converts and saves; the others then load what it wrote
        return str(ckpt)
    # (with fine-tuning every rank converts the same way and trains its share of each batch; rank 0 saves)
    _log(f"[{v.name}] converting {exp.base_model}: {', '.join(s.short() for s in v.attention) or 'no change'}",
         quiet)
    model, processor = models.load(exp.base_model, device=exp.device, dtype=models.parse_dtype(exp.dtype))
    prov: dict[str, Any] = {"source_model": exp.base_model, "variant": v.name, "variant_fingerprint": fingerprint,
                            "experiment": str(exp.path)}
    prov.update(convert_model(model, processor, v.attention, quiet=quiet))
    if v.finetune:
        from .finetune import FinetuneConfig, finetune

        cfg = FinetuneConfig.from_mapping(v.finetune, defaults=exp.data)
        prov["finetune"] = finetune(model, processor, cfg, work_dir=vdir / "finetune", teacher_ref=exp.base_model,
                                    quiet=quiet)
    if distributed.world().is_main:
        checkpoint.save(model, ckpt, processor, provenance=prov)
    del model
    gc.collect()
    distributed.barrier()
    return str(ckpt)


def run(exp: Experiment, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run every variant of ``exp`` and write ``results.json`` and the reports under ``exp.run_dir``."""
    from . import plot, report

    run_dir = exp.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    world = distributed.world()
    _check_world(run_dir, world.size, force)
    t_start = time.perf_counter()
    utts = []
    for ref in exp.test_refs:
        utts += data.load(ref, limit=exp.data.get("limit"), quiet=quiet)
    if not utts:
        raise ExperimentError(f"{exp.path}: data.test gave no utterances")
    data_desc = {"ref": " + ".join(exp.test_refs), "sets": [data.describe(r) for r in exp.test_refs],
                 "utterances": len(utts), "fingerprint": data.fingerprint_of(utts)}
    base_processor = models.load_processor(exp.base_model)
    shared = EncoderOutputs()
    entries = []
    for v in exp.variants:
        vdir = run_dir / v.name
        fingerprint = v.fingerprint(exp)
        metrics = distributed.broadcast(None if force else _done(vdir, fingerprint))
        if metrics is not None:
            _log(f"[{v.name}] done earlier: WER {100 * metrics['wer']:.2f} % (not recomputed)", quiet)
        else:
            ref = _checkpoint(exp, v, vdir, fingerprint, force, quiet)
            model = models.load_model(ref, device=exp.device, dtype=models.parse_dtype(exp.dtype))  # from disk
            processor = models.load_processor(ref) if v.model else base_processor
            _log(f"[{v.name}] evaluating {ref} on {len(utts)} utterances", quiet)
            metrics = evaluate(model, processor, utts, exp.decoding, out_dir=vdir, encoder_outputs=shared,
                               quiet=quiet, extra={"variant": v.name, "variant_fingerprint": fingerprint,
                                                   "model": ref, "data": data_desc})
            _log(f"[{v.name}] WER {100 * metrics['wer']:.2f} %", quiet)
            del model
            gc.collect()
        entries.append(_entry(v, vdir, metrics))
        _write_results(exp, entries, data_desc)
    results = _write_results(exp, entries, data_desc)
    if not world.is_main:
        return results
    results["wall_seconds_this_invocation"] = time.perf_counter() - t_start
    results["encoder_reuse"] = {"computed_batches": shared.misses, "reused_batches": shared.hits}
    png = plot.tradeoff_plot(run_dir)
    report.write_reports(run_dir)
    results["tradeoff_png"] = str(png) if png else None
    return results


def _entry(v: Variant, vdir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    valid_loss = None
    manifest = checkpoint.read_manifest(vdir / "checkpoint") if (vdir / "checkpoint").exists() else None
    if manifest:
        valid_loss = (manifest.get("provenance", {}).get("finetune") or {}).get("best_valid_loss")
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
    results = {"experiment": exp.name, "config_file": str(exp.path), "base_model": exp.base_model,
               "world_size": distributed.world().size,
               "baseline": exp.baseline, "data": {"test": data_desc, **{k: v for k, v in exp.data.items()
                                                                       if k != "test"}},
               "decoding": exp.decoding.__dict__, "variants": entries}
    if distributed.world().is_main:
        write_json_atomic(exp.run_dir / RESULTS, results)
    return results
