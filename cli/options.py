"""Options shared by several commands. Values are checked where they are parsed, so a bad one is a usage error
naming the option, never a traceback later."""

from __future__ import annotations

import click

from mla_registry.calibration import DEFAULT_CALIBRATION, DEFAULT_CALIBRATION_SIZE
from mla_registry.model_refs import DEFAULT_MODEL, DTYPES, device_problem


def model_option(default: str | None = DEFAULT_MODEL):
    return click.option("--model", "model_ref", default=default, required=default is None, show_default=True,
                        help="Hub id (openai/whisper-tiny.en), local directory/checkpoint, bundled:whisper-tiny.en or "
                        "bundled:whisper-base.")


def _device(ctx, param, value: str) -> str:
    problem = device_problem(value)
    if problem:
        raise click.BadParameter(f"'{value}': {problem}")
    return value


device_option = click.option("--device", default="cpu", show_default=True, callback=_device,
                             help="torch device: cpu, cuda, cuda:1.")
dtype_option = click.option("--dtype", default=None, type=click.Choice(DTYPES),
                            help="float32 (default), bfloat16 or float16.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Replace OUT if it holds an mla-registry checkpoint (never anything else).")


def calibration_options(fn):
    fn = click.option("--calibration-size", type=click.IntRange(min=1), default=DEFAULT_CALIBRATION_SIZE,
                      show_default=True, help="Calibration utterances.")(fn)
    return click.option("--calibration", default=DEFAULT_CALIBRATION, show_default=True,
                        help="Calibration audio of activation-aware conversions (a dataset reference; never the "
                             "test audio).")(fn)
