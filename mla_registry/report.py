"""Tables (tabulate) of evaluation results: one model's summary with its per-voice/per-source breakdown."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def evaluation_table(metrics: dict[str, Any], fmt: str = "simple") -> str:
    """One model on one dataset: totals, then a row per source and per voice."""
    head = ["group", "utts", "WER %", "CER %", "S", "D", "I", "ref words"]

    def row(name: str, m: dict[str, Any]) -> list:
        return [name, m["utterances"], pct(m["wer"]), pct(m["cer"]), m["substitutions"], m["deletions"],
                m["insertions"], m["ref_words"]]

    rows = [row("all", metrics)]
    rows += [row(f"source={k}", v) for k, v in metrics.get("by_source", {}).items()]
    if metrics.get("by_voice", {}).keys() != metrics.get("by_source", {}).keys():
        rows += [row(f"voice={k}", v) for k, v in metrics.get("by_voice", {}).items()]
    return tabulate(rows, headers=head, tablefmt=fmt)
