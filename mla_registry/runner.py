"""Run an experiment: for each variant convert (and fine-tune), save a checkpoint, reload it from disk, and
evaluate it on the same test data with the same settings; then write the comparison.

With ``data.valid`` every variant (baseline, untrained, fine-tuned alike) also gets its teacher-forced cross
entropy on the validation transcripts (:func:`~mla_registry.finetune.validation_ce`, one pass on the same model
reloaded from disk), ``valid_ce`` in its metrics, so the report can rank validation loss against test WER over
every row.

Resume: a variant is done when its ``metrics.json`` carries both of its current fingerprints (build: what makes
the checkpoint; evaluation: data, decoding, dtype); a checkpoint whose manifest carries the build fingerprint is
reused, so changing ``max_new_tokens`` re-evaluates every variant without re-converting any. The validation CE
has a fingerprint of its own (build, validation data, dtype): a finished variant without a current one gets only
that computed. Every file is written atomically, so an interrupted run leaves only finished files behind.
``force=True`` recomputes all, fine-tunes included (their saved training state is not resumed).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from . import checkpoint, data, distributed, fingerprint, lineage, model_refs
from .atomic import write_json
from .calibration import CapturedInputs
from .convert import convert_model
from .encoder_cache import EncoderOutputs, GiB
from .errors import ExperimentError
from .evaluate import evaluate
from .experiments import Experiment, Variant
from .finetune import FinetuneCaches, validation_ce
from .process_memory import peak_rss_bytes, reuse_heap_memory

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
    """Builds each variant's checkpoint (the state shared between variants: fine-tuning caches, the calibration
    capture)."""

    def __init__(self, exp: Experiment, force: bool, quiet: bool, shared: EncoderOutputs | None = None):
        self.exp, self.force, self.quiet = exp, force, quiet
        # the fine-tunes find the validation set's encoder outputs where the run's validation CE left them
        self.finetune_caches = FinetuneCaches(int(exp.encoder_cache_gib * GiB), exp.run_dir / ".finetune-inputs",
                                              encoder_outputs=shared, outputs_batch_size=exp.decoding.batch_size)
        # one calibration pass for every variant that converts the base model; its encoder outputs stay in the
        # run's cache for the fine-tunes (the calibration clips open the training set)
        self.calibration = CapturedInputs(shared, exp.decoding.batch_size)

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
                      quiet=self.quiet, captured=self.calibration)
        if v.finetune:
            from .finetune import finetune

            lineage.record_finetune(model, finetune(model, processor, v.finetune, work_dir=vdir / "finetune",
                                                    teacher_ref=exp.base_model, quiet=self.quiet,
                                                    caches=self.finetune_caches, resume=not self.force))
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


def load_valid_data(exp: Experiment, quiet: bool) -> tuple[list, dict[str, Any]] | None:
    """The validation utterances (``data.valid``) and their description for the results; ``None`` when the
    experiment has none, or when some lack a transcript (a cross entropy needs every one)."""
    if not exp.data.valid:
        return None
    utts = data.load(exp.data.valid, quiet=quiet, lazy=True)
    missing = sum(not u.text.strip() for u in utts)
    if not utts or missing:
        _log(f"data.valid {exp.data.valid!r}: {missing} of {len(utts)} utterances have no transcript: no "
             "validation CE", quiet)
        return None
    return utts, {"ref": exp.data.valid, "utterances": len(utts), "fingerprint": data.fingerprint_of(utts)}


def _valid_fingerprint(exp: Experiment, build: str, valid_desc: dict[str, Any]) -> str:
    """What the validation CE of a variant depends on: its build, the validation data, the evaluation dtype."""
    return fingerprint.of_json({"valid_ce": 1, "build": build, "data": valid_desc["fingerprint"],
                                "dtype": exp.dtype})[:16]


def _valid_ce(model, processor, valid: tuple[list, dict], vfp: str, exp: Experiment, shared: EncoderOutputs,
              quiet: bool, name: str) -> dict[str, Any]:
    """The metrics entries of a variant's validation CE (``valid_ce`` and ``valid_ce_info``)."""
    utts, desc = valid
    info = {"ref": desc["ref"], "fingerprint": vfp}
    if not isinstance(model, nn.Module):  # an exported runtime: no teacher forcing through it
        return {"valid_ce": None, "valid_ce_info": {**info, "skipped": "not a PyTorch model"}}
    out = validation_ce(model, processor, utts, exp.decoding.batch_size, encoder_outputs=shared, quiet=quiet)
    _log(f"[{name}] validation CE {out['ce']:.4f} ({out['utterances']} utterances, {out['tokens']} tokens, "
         f"{out['seconds']:.1f} s)", quiet)
    return {"valid_ce": out.pop("ce"), "valid_ce_info": {**info, **out}}


def run(exp: Experiment, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run every variant of ``exp`` and write ``results.json`` and the reports under ``exp.run_dir``."""
    from . import plot, report

    run_dir = exp.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    world = distributed.world()
    _check_world(run_dir, world.size, force)
    t_start = time.perf_counter()
    reuse_heap_memory()
    utts, data_desc = load_test_data(exp, quiet)
    valid = load_valid_data(exp, quiet)
    base_processor = model_refs.load_processor(exp.base_model)
    shared = EncoderOutputs(int(exp.encoder_cache_gib * GiB), spill_dir=run_dir / ".encoder-outputs",
                            keep=exp.keep_encoder_cache)
    builder = _Variants(exp, force, quiet, shared)
    try:
        entries = _run_variants(exp, builder, utts, valid, data_desc, base_processor, shared, quiet)
    finally:
        shared.close()
        builder.finetune_caches.close()
    results = _write_results(exp, entries, data_desc, valid)
    if not world.is_main:
        return results
    results["wall_seconds_this_invocation"] = time.perf_counter() - t_start
    results["encoder_reuse"] = shared.report()
    results["calibration_passes"] = {"captured": builder.calibration.captures, "reused": builder.calibration.reuses}
    results["audio_hours"] = sum(u.duration for u in utts) / 3600
    results["peak_rss_bytes"] = peak_rss_bytes()
    png = plot.tradeoff_plot(run_dir)
    loss_png = plot.loss_vs_wer_plot(run_dir)
    plot.curves_plot(run_dir)
    results["report"] = report.write_reports(run_dir)
    results["tradeoff_png"] = str(png) if png else None
    results["loss_vs_wer_png"] = str(loss_png) if loss_png else None
    return results


def _run_variants(exp: Experiment, builder: _Variants, utts: list, valid: tuple[list, dict] | None,
                  data_desc: dict, base_processor, shared: EncoderOutputs, quiet: bool) -> list[dict[str, Any]]:
    force = builder.force
    dtype = model_refs.parse_dtype(exp.dtype)
    entries = []
    for v in exp.variants:
        vdir = exp.run_dir / v.name
        build, evaluation = v.build_fingerprint(exp), v.eval_fingerprint(exp)
        metrics = distributed.broadcast(None if force else _done(vdir, build, evaluation))
        vfp = _valid_fingerprint(exp, build, valid[1]) if valid is not None else None
        need_valid = vfp is not None and (metrics is None or (metrics.get("valid_ce_info") or {}).get(
            "fingerprint") != vfp)
        if metrics is not None:
            _log(f"[{v.name}] done earlier: WER {100 * metrics['wer']:.2f} % (not recomputed)", quiet)
        if metrics is None or need_valid:
            ref = builder.checkpoint(v, vdir, build)
            model = model_refs.load_model(ref, device=exp.device, dtype=dtype)  # always from disk
            processor = model_refs.load_processor(ref) if v.model else base_processor
            ce = _valid_ce(model, processor, valid, vfp, exp, shared, quiet, v.name) if need_valid else {}
            if metrics is None:
                _log(f"[{v.name}] evaluating {ref} on {len(utts)} utterances", quiet)
                metrics = evaluate(model, processor, utts, exp.decoding, out_dir=vdir, encoder_outputs=shared,
                                   quiet=quiet, extra={"variant": v.name, "build_fingerprint": build,
                                                       "eval_fingerprint": evaluation, "model": ref,
                                                       "data": data_desc, "dtype": exp.dtype or "float32",
                                                       "device": exp.device, **ce})
                _log(f"[{v.name}] WER {100 * metrics['wer']:.2f} %", quiet)
            else:  # evaluated earlier: only the validation CE was missing or stale
                metrics = {**metrics, **ce}
                if distributed.world().is_main:
                    write_json(vdir / "metrics.json", metrics)
            del model
            gc.collect()
        entries.append(_entry(v, vdir, metrics, current_valid=valid is not None))
        _write_results(exp, entries, data_desc, valid)
    return entries


def _entry(v: Variant, vdir: Path, metrics: dict[str, Any], current_valid: bool) -> dict[str, Any]:
    """A variant's row of results.json. ``valid_ce``: the run's validation CE (every variant alike; none when
    the experiment has no ``data.valid`` now, whatever an earlier run left in ``metrics.json``); ``valid_loss``:
    the fine-tune's best validation loss under its own ``finetune_objective`` (fine-tuned variants only)."""
    valid_loss = objective = None
    ckpt = vdir / "checkpoint"
    if checkpoint.is_checkpoint(ckpt):
        finetunes = (checkpoint.provenance_of(checkpoint.read_manifest(ckpt) or {})).finetunes
        if finetunes:
            valid_loss = finetunes[-1].get("best_valid_loss")
            objective = (finetunes[-1].get("config") or {}).get("objective")
    return {"name": v.name, "description": v.description, "source": metrics.get("model"),
            "attention": metrics.get("attention", {}), "finetuned": bool(v.finetune),
            "valid_ce": metrics.get("valid_ce") if current_valid else None, "valid_loss": valid_loss,
            "finetune_objective": objective,
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


def _write_results(exp: Experiment, entries: list[dict], data_desc: dict, valid: tuple[list, dict] | None
                   ) -> dict[str, Any]:
    from dataclasses import asdict

    results = {"experiment": exp.name, "config_file": str(exp.path), "base_model": exp.base_model,
               "world_size": distributed.world().size, "baseline": exp.baseline,
               "data": {**{k: v for k, v in asdict(exp.data).items() if k != "test"}, "test": data_desc,
                        "validation": valid[1] if valid is not None else None},
               "decoding": asdict(exp.decoding), "variants": entries}
    if distributed.world().is_main:
        write_json(exp.run_dir / RESULTS, results)
    return results
