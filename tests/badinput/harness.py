"""Run one bad-input case in this process and classify what happened.

Outcome classes (the issue's, plus two for the valid inputs of the table):

- ``clear``: an mla-registry error (or a click usage error) whose message names every item the case lists
  (the file, key or value at fault);
- ``vague``: one of those errors, but its message does not name what is at fault;
- ``traceback``: any other exception;
- ``silent``: no error where one was due, a missing warning, a wrong result for valid input, or code from the
  input that ran;
- ``hang``: still running after :data:`TIMEOUT_S` seconds;
- ``ok``: valid input, and the result the case asserts; ``refused``: valid input refused.
"""

from __future__ import annotations

import contextlib
import os
import signal
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from mla_registry.errors import MlaRegistryError

TIMEOUT_S = 20.0
CLEAR, VAGUE, TRACEBACK, SILENT, HANG, OK, REFUSED = "clear", "vague", "traceback", "silent", "hang", "ok", "refused"
CLASSES = (CLEAR, VAGUE, TRACEBACK, SILENT, HANG, OK, REFUSED)
MARKER = "CODE_RAN"  # a payload that runs creates this file in the case's directory


@dataclass(frozen=True)
class Case:
    """One input. ``make(env, workdir)`` writes it under ``workdir`` and returns what the action takes;
    ``names`` are what a clear error must contain; a case with ``expect`` is valid input whose result
    ``expect(result, env)`` asserts."""

    id: str
    kind: str  # "checkpoint" | "model" (model and processor) | "experiment" | "data" | "cli"
    make: Callable[[Any, Path], Any]
    names: tuple[str, ...] = ()
    expect: Callable[[Any, Any], None] | None = None
    warns: str | None = None  # a warning the run must issue (valid input only)
    absent: tuple[str, ...] = ()  # what a clear error must not say (advice taken from the input itself)

    @property
    def valid(self) -> bool:
        return self.expect is not None


@dataclass
class Outcome:
    kind: str
    detail: str = ""
    warnings: list[str] = field(default_factory=list)


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` of the code under test eats it."""


class CliFailed(Exception):
    """A command that exited non-zero through click (a usage error or a ClickException): a handled error."""


@contextlib.contextmanager
def _timeout(seconds: float) -> Iterator[None]:
    def alarm(signum, frame):
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _checkpoint(arg: Any) -> Any:
    from mla_registry import checkpoint

    return checkpoint.load(arg)


def _model(arg: Any) -> Any:
    from mla_registry import model_refs

    return model_refs.load(str(arg))


def _experiment(arg: Any) -> Any:
    from mla_registry import experiments

    return experiments.load(arg)


def _data(arg: Any) -> Any:
    from mla_registry import data

    ref, kwargs = arg if isinstance(arg, tuple) else (arg, {})
    utts = data.load(ref, quiet=True, **kwargs)
    for u in utts:  # lazily loaded audio is part of the result: read it, as evaluation would
        _ = u.audio
    return utts


def _cli(args: list[str]) -> str:
    from click.testing import CliRunner

    from mla_registry.cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        raise exc.with_traceback(result.exc_info[2])
    if result.exit_code != 0:
        raise CliFailed(result.output)
    return result.output


ACTIONS: dict[str, Callable[[Any], Any]] = {"checkpoint": _checkpoint, "model": _model, "experiment": _experiment,
                                            "data": _data, "cli": _cli}
HANDLED = (MlaRegistryError, click.ClickException, CliFailed)


def run_case(case: Case, env: Any, workdir: Path, timeout: float = TIMEOUT_S) -> Outcome:
    """Make the case's input in ``workdir``, run its action there and classify the outcome."""
    workdir.mkdir(parents=True, exist_ok=True)
    arg = case.make(env, workdir)
    with warnings.catch_warnings(record=True) as caught, _cwd(workdir):
        warnings.simplefilter("always")
        outcome = _classify(case, env, arg, timeout)
    outcome.warnings = [str(w.message) for w in caught]
    if (workdir / MARKER).exists():
        return Outcome(SILENT, f"code from the input ran: {(workdir / MARKER).read_text()!r}")
    if outcome.kind == OK and case.warns and not any(case.warns in m for m in outcome.warnings):
        return Outcome(SILENT, f"no warning mentioning {case.warns!r}; warnings: {outcome.warnings}")
    return outcome


def _classify(case: Case, env: Any, arg: Any, timeout: float) -> Outcome:
    try:
        with _timeout(timeout):
            result = ACTIONS[case.kind](arg)
    except Hang:
        return Outcome(HANG, f"no result after {timeout:.0f} s")
    except HANDLED as exc:
        message = str(exc)
        if case.valid:
            return Outcome(REFUSED, message)
        missing = [n for n in case.names if n not in message]
        if missing:
            return Outcome(VAGUE, f"does not name {missing}: {message}")
        said = [a for a in case.absent if a in message]
        return Outcome(VAGUE, f"says {said}: {message}") if said else Outcome(CLEAR, message)
    except Exception as exc:  # noqa: BLE001 - every other exception is what the harness counts
        tb = traceback.format_exception(exc)
        return Outcome(TRACEBACK, f"{type(exc).__name__}: {str(exc)[:300]}\n{''.join(tb[-3:])[:1500]}")
    if not case.valid:
        return Outcome(SILENT, f"no error; result: {str(result)[:300]!r}")
    try:
        case.expect(result, env)
    except AssertionError as exc:
        return Outcome(SILENT, f"wrong result: {exc}")
    return Outcome(OK)
