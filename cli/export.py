"""``mla-registry export``: a checkpoint as a plain transformers directory, a CTranslate2 model, or ONNX graphs."""

from __future__ import annotations

import click

from mla_registry.export.core import FORMATS
from mla_registry.export.ct2 import QUANTIZATIONS

from .options import quiet_option


@click.command("export")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "fmt", type=click.Choice(FORMATS), required=True, help="Target format.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Directory to write (new, empty, or with --overwrite a previous export).")
@click.option("--quantization", type=click.Choice(QUANTIZATIONS), default=None,
              help="--to ctranslate2 only: weight type (default float32).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it holds a previous export (never anything else).")
@quiet_option
def command(ckpt, fmt, out, quantization, overwrite, quiet) -> None:
    """Export checkpoint CKPT to another runtime, with its provenance (mla_registry_export.json) beside it.

    \b
    transformers  stock WhisperForConditionalGeneration (MLA re-expanded, GQA heads repeated): loads with plain
                  transformers, no mla-registry; full K/V cache again
    ctranslate2   the same through CTranslate2's converter (faster-whisper); full K/V cache
    onnx          encoder / cross-cache / decoder-step graphs keeping the plugin's own cache (MLA: the latent);
                  run with: mla-registry evaluate --model OUT --backend onnxruntime

    \b
    Examples:
      mla-registry export ckpt/mla192 --to transformers --out exports/mla192-hf
      mla-registry export ckpt/mla192 --to ctranslate2 --quantization int8 --out exports/mla192-ct2
      mla-registry export ckpt/mla192 --to onnx --out exports/mla192-onnx
    """
    from mla_registry.export import export

    info = export(ckpt, fmt, out, quantization=quantization, overwrite=overwrite, quiet=quiet)
    click.echo(f"wrote {out} ({fmt}) from {ckpt}")
    click.echo(f"cache: {info['cache']}")
    click.echo(f"provenance: {out}/mla_registry_export.json (manifest fingerprint {info['manifest_fingerprint'][:12]})")
