"""Options shared by several commands."""

from __future__ import annotations

import click

from mla_registry.models import DEFAULT_MODEL


def model_option(default: str | None = DEFAULT_MODEL):
    return click.option("--model", "model_ref", default=default, required=default is None, show_default=True,
                        help="Hub id (openai/whisper-tiny.en), local directory/checkpoint, or bundled:whisper-tiny.en.")


device_option = click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1.")
dtype_option = click.option("--dtype", default=None, help="float32 (default), bfloat16 or float16.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
