"""``mla-registry import-ct2``: a CTranslate2 Whisper model into a Hugging Face model directory."""

from __future__ import annotations

import click


@click.command("import-ct2")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it holds a model imported earlier.")
def command(src: str, out: str, overwrite: bool) -> None:
    """Import the CTranslate2 Whisper model in SRC (model.bin, config.json, tokenizer.json) as a Hugging Face
    directory that WhisperForConditionalGeneration / WhisperProcessor.from_pretrained load.

    \b
    Example:
      mla-registry import-ct2 ~/models/faster-whisper-base.en --out models/whisper-base.en
    """
    from mla_registry.ct2_import import import_ct2

    click.echo(f"wrote {import_ct2(src, out, overwrite=overwrite)}")
