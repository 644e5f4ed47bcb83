"""``mla-registry evaluate``: WER/CER of one model on one dataset."""

from __future__ import annotations

import click
from tabulate import tabulate_formats

from mla_registry import config
from mla_registry.evaluate import DecodeSettings
from mla_registry.export.backends import BACKENDS

from .options import device_option, dtype_option, model_option, quiet_option


@click.command("evaluate")
@model_option()
@click.option("--data", "data_ref", default="builtin:real", show_default=True,
              help="builtin:real, builtin:tts-test[?size=N], an audiofolder directory, a CSV file, or "
                   "hf:NAME?config=C&split=S.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N utterances.")
@config.click_options(DecodeSettings)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write predictions.jsonl and metrics.json here (a new or empty directory, or a previous "
                   "evaluation's).")
@click.option("--skip-bad", is_flag=True, help="Skip (and count) unreadable, empty or silent audio files.")
@click.option("--format", "fmt", type=click.Choice(tabulate_formats), default="simple", show_default=True,
              help="Table format (tabulate).")
@click.option("--backend", type=click.Choice(BACKENDS), default="pytorch", show_default=True,
              help="Runtime: pytorch (any model), or an export's runtime: onnxruntime (--model DIR from 'export --to "
                   "onnx'), ctranslate2 (--model DIR from 'export --to ctranslate2').")
@device_option
@dtype_option
@quiet_option
def command(model_ref, data_ref, limit, out, skip_bad, fmt, backend, device, dtype, quiet, **decoding) -> None:
    """Transcribe a dataset and print WER/CER, overall and per source/voice.

    \b
    Examples:
      mla-registry evaluate --model bundled:whisper-tiny.en --data builtin:real
      mla-registry evaluate --model ckpt/mla192 --data builtin:tts-test --out runs/mla192
      mla-registry evaluate --model openai/whisper-tiny.en --data 'hf:openslr/librispeech_asr?config=clean&split=test'
      torchrun --nproc-per-node 4 -m mla_registry.cli.main evaluate --model ckpt/mla192 --device cuda
      mla-registry evaluate --model exports/mla192-onnx --backend onnxruntime
    """
    from mla_registry import data, distributed, model_refs
    from mla_registry.evaluate import check_output_dir, evaluate
    from mla_registry.report import evaluation_table

    settings = config.from_cli(DecodeSettings, decoding)
    if out:
        check_output_dir(out)
    world, device = distributed.setup(device)  # under torchrun: join the group, shard the batches
    quiet = quiet or not world.is_main
    if backend == "pytorch":
        model, processor = model_refs.load(model_ref, device=device, dtype=model_refs.parse_dtype(dtype))
        settings.check_model(model)
    else:
        from mla_registry.export.backends import load_backend

        if world.size > 1:  # the exported runtimes' loop does not shard: every rank would decode everything
            raise click.UsageError(f"--backend {backend} runs in one process; launch it without torchrun")

        model = load_backend(backend, model_ref, device)
        processor = model.processor()
    utts = data.load(data_ref, limit=limit, skip_bad=skip_bad, quiet=quiet, lazy=True)  # read batch by batch
    metrics = evaluate(model, processor, utts, settings, out_dir=out, quiet=quiet,
                       extra={"model": model_ref, "data": data.describe(data_ref)})
    if not world.is_main:
        return
    if "backend" in metrics:
        click.echo(f"backend {backend}: {metrics['backend']}")
    if metrics.get("cache_shapes"):
        click.echo("cache tensors held (last batch): " + ", ".join(
            f"{n} {'x'.join(map(str, s))}" for n, s in metrics["cache_shapes"].items()))
    click.echo(f"model {model_ref} on {data_ref} ({metrics['utterances']} utterances; normaliser: "
               f"{metrics['normalizer']})")
    click.echo(evaluation_table(metrics, fmt))
    click.echo(f"{metrics['audio_seconds'] / 3600:.3f} h of audio; decode {metrics['decode_tokens_per_second']:.1f} "
               f"tokens/s, real-time factor {metrics['real_time_factor']:.3f}, peak RSS "
               f"{metrics['peak_rss_bytes'] / 2**30:.2f} GiB")
    if out:
        click.echo(f"wrote {out}/predictions.jsonl and {out}/metrics.json")
