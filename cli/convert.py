"""``mla-registry convert``: swap attention modules and save a self-describing checkpoint."""

from __future__ import annotations

import click

from .options import calibration_options, device_option, dtype_option, model_option, overwrite_option, quiet_option


@click.command("convert")
@model_option()
@click.option("--attention", "-a", "specs", multiple=True, required=True,
              help="SELECTOR=PLUGIN[:key=value,...]; repeatable; later ones win where they overlap.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@calibration_options
@overwrite_option
@device_option
@dtype_option
@quiet_option
def command(model_ref: str, specs: tuple[str, ...], out: str, calibration: str, calibration_size: int,
            overwrite: bool, device: str, dtype: str | None, quiet: bool) -> None:
    """Convert the attention slots a selector names with a plugin, and save the result. OUT must be new, empty,
    or (with --overwrite) a previous checkpoint: nothing else there is ever touched.

    \b
    SELECTOR: encoder.self, decoder.self, decoder.cross, globs (decoder.*, *), one layer (decoder.self.0),
    layer lists (decoder.cross[0,2-3]), several joined with '+'. kwargs: see 'mla-registry plugins'.

    \b
    Examples:
      mla-registry convert --attention 'decoder.*=mla:rank=192' --out ckpt/mla192
      mla-registry convert --attention 'decoder.self=gqa:kv_heads=2' \\
                           --attention 'decoder.cross=mla:rank=96,init=svd' --out ckpt/mixed
    """
    from mla_registry import checkpoint
    from mla_registry.calibration import CalibrationSettings
    from mla_registry.convert import convert_and_save
    from mla_registry.surgery import short_form

    path = convert_and_save(model_ref, list(specs), out, CalibrationSettings(calibration, calibration_size),
                            device=device, dtype=dtype, overwrite=overwrite, quiet=quiet)
    records = checkpoint.slot_records(checkpoint.read_manifest(path) or {}, path)
    by_kind: dict[str, list] = {}
    for r in records:
        by_kind.setdefault(r.kind, []).append(r)
    for kind, rs in by_kind.items():
        plugins = sorted({r.plugin for r in rs})
        label = "/".join(short_form(p, [r.kwargs for r in rs if r.plugin == p]) for p in plugins)
        click.echo(f"{kind:14s} {label}  ({len(rs)} layers)")
        if any(r.kwargs != rs[0].kwargs for r in rs):  # per-slot decisions (e.g. ranks under a KV budget)
            for r in rs:
                click.echo(f"  {r.slot:18s} {r.plugin}({', '.join(f'{k}={v}' for k, v in r.kwargs.items())})")
    click.echo(f"wrote {path}")
