"""``mla-registry plugins``: every attention type, who provides it, and its kwargs."""

from __future__ import annotations

import click
from tabulate import tabulate

from mla_registry.registry import get_registry


@click.command("plugins")
def command() -> None:
    """List the installed attention plugins with their kwargs (type, default, meaning).

    \b
    Example:
      mla-registry plugins
    """
    reg = get_registry()
    for name in sorted(reg.builders):
        b = reg.builders[name]
        click.echo(f"{name}  (plugin version {b.version}; from {b.package})  {b.description}")
        rows = [[k.name, k.type.__name__, k.describe_default(),
                 k.help + (f" [{'|'.join(map(str, k.choices))}]" if k.choices else "")] for k in b.kwargs]
        if rows:
            click.echo(tabulate(rows, headers=["kwarg", "type", "default", "meaning"], tablefmt="simple"))
        click.echo()
    for name, why in reg.broken.items():
        click.echo(f"BROKEN {name}: {why}", err=True)
