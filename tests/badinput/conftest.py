"""Print the count of bad-input outcomes per class after the run (the figures the README of this folder keeps)."""

from __future__ import annotations

import collections
import json
import os
import sys


def pytest_terminal_summary(terminalreporter):
    module = next((m for name, m in sys.modules.items() if name.endswith("test_bad_inputs")), None)
    outcomes = getattr(module, "OUTCOMES", None)
    if not outcomes:
        return
    if os.environ.get("BADINPUT_REPORT"):  # every case's outcome and detail, for reading the failures at leisure
        with open(os.environ["BADINPUT_REPORT"], "w") as f:
            json.dump(outcomes, f, indent=1)
    counts = collections.Counter(kind for kind, _ in outcomes.values())
    by_group = collections.Counter((cid.split("/")[0], kind) for cid, (kind, _) in outcomes.items())
    terminalreporter.write_line(f"bad inputs: {len(outcomes)} cases; " + ", ".join(
        f"{k} {n}" for k, n in sorted(counts.items())))
    for (group, kind), n in sorted(by_group.items()):
        terminalreporter.write_line(f"  {group:10s} {kind:10s} {n}")
