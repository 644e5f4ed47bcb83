"""``mla-registry selftest``: does this installation convert, save, reload and decode every built-in plugin?"""

from __future__ import annotations

import click
from tabulate import tabulate


@click.command("selftest")
@click.option("--clips", type=click.IntRange(min=1, max=8), default=2, show_default=True,
              help="Real LibriSpeech clips decoded per case.")
def command(clips: int) -> None:
    """Convert the bundled Whisper tiny.en with every built-in plugin, decode real clips with and without the
    KV cache (they must agree), save each checkpoint and reload it in a fresh Python process (tokens must equal
    the saved model's). Exits 1 when any case fails. About a minute on two CPU cores.

    \b
    Example:
      mla-registry selftest
    """
    from mla_registry import selftest

    results, env = selftest.run(clips=clips)
    rows = [[r.name, r.spec, "yes" if r.cache_agrees else "NO", "yes" if r.reload_agrees else "NO", r.tokens,
             r.text[:60]] for r in results]
    click.echo(tabulate(rows, headers=["case", "attention", "cache = no cache", "fresh reload = saved", "tokens",
                                       "first clip"]))
    click.echo(", ".join(f"{k} {v}" for k, v in env.items()))
    failed = [r.name for r in results if not r.ok]
    if failed:
        raise click.ClickException(f"selftest FAILED for {', '.join(failed)} on this installation")
    click.echo("selftest passed")
