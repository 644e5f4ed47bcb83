"""``mla-registry evaluate``: WER/CER of one model on one dataset."""

from __future__ import annotations

import click

from .options import device_option, dtype_option, model_option, quiet_option


@click.command("evaluate")
@model_option()
@click.option("--data", "data_ref", default="builtin:real", show_default=True,
              help="builtin:real, builtin:tts-test[?size=N], an audiofolder directory, a CSV file, or "
                   "hf:NAME?config=C&split=S.")
@click.option("--limit", type=int, default=None, help="Only the first N utterances.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--beams", type=int, default=1, show_default=True, help="1 = greedy.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write predictions.jsonl and metrics.json here.")
@click.option("--skip-bad", is_flag=True, help="Skip (and count) unreadable, empty or silent audio files.")
@click.option("--format", "fmt", default="simple", show_default=True, help="tabulate format: simple, github, ...")
@device_option
@dtype_option
@quiet_option
def command(model_ref, data_ref, limit, batch_size, beams, max_new_tokens, out, skip_bad, fmt, device, dtype,
            quiet) -> None:
    """Transcribe a dataset and print WER/CER, overall and per source/voice.

    \b
    Examples:
      mla-registry evaluate --model bundled:whisper-tiny.en --data builtin:real
      mla-registry evaluate --model ckpt/mla192 --data builtin:tts-test --out runs/mla192
      mla-registry evaluate --model openai/whisper-tiny.en --data 'hf:openslr/librispeech_asr?config=clean&split=test'
      torchrun --nproc-per-node 4 -m mla_registry.cli.main evaluate --model ckpt/mla192 --device cuda
    """
    from mla_registry import data, distributed, models
    from mla_registry.evaluate import DecodeSettings, evaluate
    from mla_registry.report import evaluation_table

    world, device = distributed.setup(device)  # under torchrun: join the group, shard the batches
    quiet = quiet or not world.is_main
    model, processor = models.load(model_ref, device=device, dtype=models.parse_dtype(dtype))
    utts = data.load(data_ref, limit=limit, skip_bad=skip_bad, quiet=quiet)
    settings = DecodeSettings(batch_size=batch_size, num_beams=beams, max_new_tokens=max_new_tokens)
    metrics = evaluate(model, processor, utts, settings, out_dir=out, quiet=quiet,
                       extra={"model": model_ref, "data": data.describe(data_ref)})
    if not world.is_main:
        return
    click.echo(f"model {model_ref} on {data_ref} ({metrics['utterances']} utterances; normaliser: "
               f"{metrics['normalizer']})")
    click.echo(evaluation_table(metrics, fmt))
    click.echo(f"decode {metrics['decode_tokens_per_second']:.1f} tokens/s, real-time factor "
               f"{metrics['real_time_factor']:.3f}")
    if out:
        click.echo(f"wrote {out}/predictions.jsonl and {out}/metrics.json")
