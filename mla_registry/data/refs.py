"""Parse a dataset reference string (see :mod:`mla_registry.data` for the syntax) into its kind and options."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from mla_registry.errors import DataError

KINDS = ("builtin", "hf", "audiofolder", "csv")


@dataclass(frozen=True)
class Ref:
    """A parsed reference: ``kind`` is one of KINDS; ``target`` the builtin name, hub id/dir or local path."""

    raw: str
    kind: str
    target: str
    params: dict[str, str] = field(default_factory=dict)

    def take(self, allowed: dict[str, str | None]) -> dict[str, str | None]:
        """Params with defaults filled in; an unknown key is a DataError naming it."""
        unknown = sorted(set(self.params) - set(allowed))
        if unknown:
            raise DataError(
                f"data reference {self.raw!r}: unknown option {unknown[0]!r}; "
                f"{self.kind} references take {', '.join(sorted(allowed)) or 'no options'}"
            )
        return {k: self.params.get(k, v) for k, v in allowed.items()}


def _query(raw: str, query: str) -> dict[str, str]:
    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as e:
        raise DataError(f"data reference {raw!r}: malformed query {query!r} (expected key=value&key=value)") from e
    out: dict[str, str] = {}
    for k, v in pairs:
        if k in out:
            raise DataError(f"data reference {raw!r}: option {k!r} given twice")
        if v == "":
            raise DataError(f"data reference {raw!r}: option {k!r} has no value")
        out[k] = v
    return out


def parse(ref: str) -> Ref:
    """Split ``ref`` into a :class:`Ref`; a string that is neither ``builtin:``/``hf:`` nor an existing CSV file or
    directory is a DataError."""
    if not isinstance(ref, (str, os.PathLike)):
        raise DataError(f"data reference must be a string, got {type(ref).__name__}: {ref!r}")
    raw = os.fspath(ref)
    if not raw.strip():
        raise DataError("empty data reference")
    for scheme in ("builtin", "hf"):
        if raw.startswith(scheme + ":"):
            body = raw[len(scheme) + 1 :]
            target, _, query = body.partition("?")
            if not target:
                raise DataError(f"data reference {raw!r}: nothing after {scheme + ':'!r}")
            return Ref(raw, scheme, target, _query(raw, query))
    path = Path(raw).expanduser()
    if raw.lower().endswith(".csv"):
        if not path.is_file():
            raise DataError(f"data reference {raw!r}: CSV file {path} does not exist")
        return Ref(raw, "csv", str(path.resolve()))
    if path.is_dir():
        return Ref(raw, "audiofolder", str(path.resolve()))
    if path.exists():
        raise DataError(f"data reference {raw!r}: {path} is a file but not a .csv; expected a CSV or a directory")
    raise DataError(
        f"data reference {raw!r} is not understood: expected builtin:NAME, hf:NAME_OR_DIR[?options], "
        "an audiofolder directory or a .csv file (no such file or directory)"
    )
