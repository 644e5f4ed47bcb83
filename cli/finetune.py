"""``mla-registry finetune``: recovery fine-tuning of a converted checkpoint into a new checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from mla_registry.finetune import DECAYS, OBJECTIVES, TRAINABLE, FinetuneConfig

from .options import device_option, dtype_option, quiet_option


def _default(name: str):
    return FinetuneConfig.__dataclass_fields__[name].default


@click.command("finetune")
@click.option("--model", "model_ref", required=True,
              help="The checkpoint to fine-tune (from mla-registry convert), or any model reference.")
@click.option("--train", "train_ref", required=True, help="Training data reference, e.g. builtin:tts-train.")
@click.option("--valid", "valid_ref", required=True,
              help="Validation data reference (early stopping, best weights), e.g. builtin:tts-valid.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Write the fine-tuned checkpoint here.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=_default("objective"), show_default=True,
              help="ce: cross-entropy on transcripts; distill: KL to the teacher's teacher-forced logits; "
                   "ce+distill: their sum (KL weighted by --distill-weight).")
@click.option("--distill-weight", type=float, default=_default("distill_weight"), show_default=True)
@click.option("--temperature", type=float, default=_default("temperature"), show_default=True,
              help="Distillation temperature.")
@click.option("--trainable", type=click.Choice(TRAINABLE), default=_default("trainable"), show_default=True,
              help="converted: the converted attention modules; kv: their key/value projections only; "
                   "attention: every decoder attention module; decoder; all.")
@click.option("--steps", type=int, default=_default("steps"), show_default=True)
@click.option("--batch-size", type=int, default=_default("batch_size"), show_default=True)
@click.option("--lr", type=float, default=_default("lr"), show_default=True)
@click.option("--warmup-steps", type=int, default=_default("warmup_steps"), show_default=True)
@click.option("--decay", type=click.Choice(DECAYS), default=_default("decay"), show_default=True,
              help="Learning-rate decay after warm-up.")
@click.option("--weight-decay", type=float, default=_default("weight_decay"), show_default=True)
@click.option("--eval-every", type=int, default=_default("eval_every"), show_default=True,
              help="Validation loss every N steps (and at step 0 and at the end).")
@click.option("--patience", type=int, default=_default("patience"), show_default=True,
              help="Stop after N validations without improvement (0: never).")
@click.option("--max-grad-norm", type=float, default=_default("max_grad_norm"), show_default=True,
              help="Gradient clipping (0: none).")
@click.option("--seed", type=int, default=_default("seed"), show_default=True)
@click.option("--train-limit", type=int, default=None, help="Only the first N training utterances.")
@click.option("--valid-limit", type=int, default=None, help="Only the first N validation utterances.")
@click.option("--teacher", "teacher_ref", default=None,
              help="The original model for distill (default: the checkpoint's provenance source_model).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Resumable training state (default: OUT.work). Rerun the same command to resume.")
@device_option
@dtype_option
@quiet_option
def command(model_ref, train_ref, valid_ref, out, objective, distill_weight, temperature, trainable, steps,
            batch_size, lr, warmup_steps, decay, weight_decay, eval_every, patience, max_grad_norm, seed,
            train_limit, valid_limit, teacher_ref, work_dir, device, dtype, quiet) -> None:
    """Fine-tune a converted model to recover accuracy; write a checkpoint whose provenance keeps the training
    configuration and the validation curve. The weights with the lowest validation loss are kept. An
    interrupted run resumes from its last validation when the same command runs again.

    \b
    Examples:
      mla-registry convert --model bundled:whisper-tiny.en --attention 'decoder.*=mla:rank=96' --out ckpt/mla96
      mla-registry finetune --model ckpt/mla96 --train builtin:tts-train --valid builtin:tts-valid \\
          --objective distill --trainable kv --lr 1e-4 --steps 300 --out ckpt/mla96-ft
      mla-registry evaluate --model ckpt/mla96-ft --data builtin:tts-test
      torchrun --standalone --nproc-per-node 2 -m mla_registry.cli.main finetune --model ckpt/mla96 ...
    """
    from mla_registry import checkpoint, distributed, models
    from mla_registry.errors import MlaRegistryError
    from mla_registry.finetune import finetune

    world, device = distributed.setup(device)  # under torchrun: data-parallel, rank 0 writes

    cfg = FinetuneConfig(train=train_ref, valid=valid_ref, objective=objective, distill_weight=distill_weight,
                         trainable=trainable, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, eval_every=eval_every, patience=patience,
                         max_grad_norm=max_grad_norm, seed=seed, train_limit=train_limit, valid_limit=valid_limit,
                         temperature=temperature, decay=decay)
    model, processor = models.load(model_ref, device=device, dtype=models.parse_dtype(dtype))
    previous = dict(getattr(model, checkpoint.PROVENANCE_ATTR, {}) or {})
    teacher_ref = teacher_ref or previous.get("source_model")
    if cfg.uses_distill and not teacher_ref:
        raise MlaRegistryError(f"{model_ref} records no source_model in its provenance: pass --teacher with the "
                               "original (unconverted) model for objective " + repr(objective))
    work = Path(work_dir) if work_dir else Path(str(Path(out)) + ".work")
    result = finetune(model, processor, cfg, work_dir=work, teacher_ref=teacher_ref, quiet=quiet)
    result = {"model": model_ref, **result}
    extra = {"finetune": result}
    if previous.get("finetune"):
        extra["finetune_history"] = [*previous.get("finetune_history", []), previous["finetune"]]
    if not world.is_main:
        return
    checkpoint.save(model, out, processor, provenance={**extra, "world_size": world.size})
    click.echo(f"valid loss {result['initial_valid_loss']:.4f} -> {result['best_valid_loss']:.4f} (best at step "
               f"{result['best_step']} of {result['steps_done']}{', stopped early' if result['stopped_early'] else ''}"
               f"), {result['seconds']:.0f} s")
    click.echo(f"wrote {out} (training state in {work})")
