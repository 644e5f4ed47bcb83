"""mla_registry.atomic: writes appear whole or not at all, with the user's usual mode, and the temporaries of a
killed writer are cleaned up by the next write."""

from __future__ import annotations

import os
import stat
import time

import pytest

from mla_registry import atomic


def test_files_are_replaced_whole_with_the_usual_mode(tmp_path):
    mask = os.umask(0o027)
    try:
        atomic.write_json(tmp_path / "r.json", {"a": 1})
        atomic.write_text(tmp_path / "r.json", '{"a": 2}\n')
    finally:
        os.umask(mask)
    assert (tmp_path / "r.json").read_text() == '{"a": 2}\n'
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_failed_directory_write_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "d"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "f").write_text("one")
    with pytest.raises(RuntimeError), atomic.atomic_dir(target) as tmp:
        (tmp / "f").write_text("two")
        raise RuntimeError("interrupted")
    assert (target / "f").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_stale_temporaries_of_this_target_only_are_removed(tmp_path):
    old = time.time() - 2 * atomic.STALE_SECONDS
    stale, fresh, other = tmp_path / ".r.json.x1.tmp", tmp_path / ".r.json.x2.tmp", tmp_path / ".q.json.x3.tmp"
    for p in (stale, fresh, other):
        p.write_text("partial")
    for p in (stale, other):
        os.utime(p, (old, old))
    atomic.write_text(tmp_path / "r.json", "done")
    assert not stale.exists() and fresh.exists() and other.exists()
