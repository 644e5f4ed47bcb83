"""The ``mla-registry`` command group. Each command is a thin shell over one library function."""

from __future__ import annotations

import sys
import warnings

import click

from mla_registry import __version__
from mla_registry.errors import MlaRegistryError


class Group(click.Group):
    """A click group that prints mla-registry errors as one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MlaRegistryError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="mla-registry")
def cli() -> None:
    """Convert the attention of a pretrained Whisper model (MHA -> GQA / MLA), save it as a self-describing
    checkpoint, reload it, and measure its test word error rate.

    \b
    Examples:
      mla-registry plugins
      mla-registry evaluate --model bundled:whisper-tiny.en --data builtin:real
      mla-registry convert --model bundled:whisper-tiny.en --attention 'decoder.*=mla:rank=192' --out ckpt/mla192
      mla-registry evaluate --model ckpt/mla192 --data builtin:tts-test --out runs/mla192
    """
    if not sys.warnoptions:
        warnings.filterwarnings("once", category=UserWarning, module="mla_registry")
    import transformers

    # transformers' generate() warns on every call about settings Whisper itself passes; keep the output readable
    transformers.logging.set_verbosity_error()


def _register() -> None:
    from . import convert, evaluate, export, finetune, import_ct2, plugins, report, run, selftest

    for module in (plugins, import_ct2, convert, finetune, evaluate, export, run, report, selftest):
        cli.add_command(module.command)


_register()


def main() -> None:
    """Entry point for ``python -m mla_registry.cli.main`` (and so for torchrun): under a launcher, a rank that
    fails has its error recorded so the launcher reports it as the root cause while it stops the other ranks."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(cli)()


if __name__ == "__main__":  # pragma: no cover
    main()
