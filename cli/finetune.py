"""``mla-registry finetune``: recovery fine-tuning of a converted checkpoint into a new checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from mla_registry import config
from mla_registry.finetune import FinetuneConfig

from .options import device_option, dtype_option, overwrite_option, quiet_option


@click.command("finetune")
@click.option("--model", "model_ref", required=True,
              help="The checkpoint to fine-tune (from mla-registry convert), or any model reference.")
@click.option("--train", "train_ref", required=True, help="Training data reference, e.g. builtin:tts-train.")
@click.option("--valid", "valid_ref", required=True,
              help="Validation data reference (early stopping, best weights), e.g. builtin:tts-valid.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Write the fine-tuned checkpoint here.")
@config.click_options(FinetuneConfig)
@click.option("--teacher", "teacher_ref", default=None,
              help="The original model for distill (default: the checkpoint's provenance source_model).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Resumable training state (default: OUT.work). Rerun the same command to resume.")
@overwrite_option
@device_option
@dtype_option
@quiet_option
def command(model_ref, train_ref, valid_ref, out, teacher_ref, work_dir, overwrite, device, dtype, quiet,
            **settings) -> None:
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
    from mla_registry import checkpoint, distributed, lineage, model_refs
    from mla_registry.errors import MlaRegistryError
    from mla_registry.finetune import finetune

    cfg = config.from_cli(FinetuneConfig, settings, train=train_ref, valid=valid_ref)
    checkpoint.check_target(out, overwrite)  # before training, not after
    world, device = distributed.setup(device)  # under torchrun: data-parallel, rank 0 writes
    model, processor = model_refs.load(model_ref, device=device, dtype=model_refs.parse_dtype(dtype))
    teacher_ref = teacher_ref or lineage.of(model).provenance.source_model
    if cfg.uses_distill and not teacher_ref:
        raise MlaRegistryError(f"{model_ref} records no source_model in its provenance: pass --teacher with the "
                               f"original (unconverted) model for objective {cfg.objective!r}")
    work = Path(work_dir) if work_dir else Path(str(Path(out)) + ".work")
    result = finetune(model, processor, cfg, work_dir=work, teacher_ref=teacher_ref, quiet=quiet)
    lineage.record_finetune(model, {"model": model_ref, **result, "world_size": world.size})
    if not world.is_main:
        return
    checkpoint.save(model, out, processor, overwrite=overwrite)
    click.echo(f"valid loss {result['initial_valid_loss']:.4f} -> {result['best_valid_loss']:.4f} (best at step "
               f"{result['best_step']} of {result['steps_done']}{', stopped early' if result['stopped_early'] else ''}"
               f"), {result['seconds']:.0f} s")
    click.echo(f"wrote {out} (training state in {work})")
