"""``mla-registry convert``: swap attention modules and save a self-describing checkpoint."""

from __future__ import annotations

import click

from .options import device_option, dtype_option, model_option, quiet_option


@click.command("convert")
@model_option()
@click.option("--attention", "-a", "specs", multiple=True, required=True,
              help="SELECTOR=PLUGIN[:key=value,...]; repeatable; later ones win where they overlap.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@device_option
@dtype_option
@quiet_option
def command(model_ref: str, specs: tuple[str, ...], out: str, device: str, dtype: str | None, quiet: bool) -> None:
    """Convert the attention slots a selector names with a plugin, and save the result.

    \b
    SELECTOR: encoder.self, decoder.self, decoder.cross, globs (decoder.*, *), one layer (decoder.self.0),
    layer lists (decoder.cross[0,2-3]), several joined with '+'. kwargs: see 'mla-registry plugins'.

    \b
    Examples:
      mla-registry convert --attention 'decoder.*=mla:rank=192' --out ckpt/mla192
      mla-registry convert --attention 'decoder.self=gqa:kv_heads=2' \\
                           --attention 'decoder.cross=mla:rank=96,init=svd' --out ckpt/mixed
    """
    from mla_registry.convert import convert_and_save

    path = convert_and_save(model_ref, list(specs), out, device=device, dtype=dtype, quiet=quiet)
    click.echo(f"wrote {path}")
