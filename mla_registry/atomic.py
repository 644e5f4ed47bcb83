"""Atomic writes: every file and directory mla-registry writes appears whole under its name or not at all.

Files go through a temporary sibling and ``os.replace``; directories (checkpoints, training state) through a
temporary sibling directory that replaces the target when it is complete. Everything written gets the mode the
user's umask gives an ordinary new file or directory (``mkstemp``/``mkdtemp`` would leave 0600/0700). A process
killed mid-write leaves a hidden ``.NAME.*.tmp`` sibling; the next write of the same target removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
STALE_SECONDS = 3600.0  # a temporary older than this belongs to a dead writer (ours are seconds to minutes old)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}."


def remove_stale_temporaries(target: str | os.PathLike, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove the hidden temporaries an interrupted write of ``target`` left beside it (ours only: same prefix and
    suffix, older than ``older_than`` seconds, so a concurrent writer's live temporary is kept). Returns them."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    now = time.time()
    for p in target.parent.glob(f"{_tmp_prefix(target)}*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            if now - p.lstat().st_mtime >= older_than:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
    old = target.with_name(f".{target.name}.old")  # left when a kill hit between the two renames of atomic_dir
    if old.exists() and target.exists():
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _fix_modes(root: Path) -> None:
    """Give every file and directory under ``root`` the user's usual mode (libraries such as safetensors and
    transformers write some files 0600 through their own temporaries)."""
    mask = _umask()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` (a half-written directory never
    appears under ``target``'s name). On error the temporary directory is removed and ``target`` is untouched.
    Deciding whether ``target`` may be replaced is the caller's business (see ``checkpoint.check_target``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), suffix=TMP_SUFFIX, dir=target.parent))
    try:
        yield tmp
        _fix_modes(tmp)
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} already exists")
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
