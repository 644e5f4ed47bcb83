"""Tables (tabulate) of evaluation results: one model's summary with its per-voice/per-source breakdown, and the
comparison of the variants of one run (``runs/<experiment>/``) against its baseline."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from . import stats
from .atomic import write_text
from .errors import ExperimentError
from .surgery import attention_label


def pct(x: float | None) -> str:
    """A rate as a percentage with two decimals; blank for ``None``."""
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


# --- comparison of the variants of one run ---------------------------------------------------------------------

FORMATS = ("simple", "github", "csv", "latex")
_ASCII_FORMATS = ("csv", "latex")  # no unicode minus or Greek letters where tools or TeX may choke on them

_HEADERS = {  # key of a comparison row -> (header, ascii header)
    "variant": ("variant", "variant"),
    "attention": ("attention", "attention"),
    "params": ("params", "params"),
    "kv_self": ("KV self B/token", "KV self B/token"),
    "kv_self_utt": ("KV self/utt", "KV self/utt"),
    "kv_self_rel": ("self vs base", "self vs base"),
    "kv_cross": ("KV cross/utt", "KV cross/utt"),
    "kv_cross_rel": ("cross vs base", "cross vs base"),
    "wer": ("WER %", "WER %"),
    "cer": ("CER %", "CER %"),
    "sdi": ("S/D/I", "S/D/I"),
    "delta_wer": ("ΔWER pp [95% CI]", "dWER pp [95% CI]"),
    "p_improve": ("P(improve)", "P(improve)"),
    "valid_ce": ("valid CE", "valid CE"),
    "valid_loss": ("FT valid loss", "FT valid loss"),
    "tokens_per_s": ("tok/s", "tok/s"),
    "rtf": ("RTF", "RTF"),
}


@dataclass
class Run:
    """A run directory read once: ``results.json`` plus each variant's metrics (predictions are read lazily)."""

    dir: Path
    results: dict[str, Any]
    variants: list[dict[str, Any]]
    _predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    _rows: dict[tuple[int, int], list[dict[str, str]]] = field(default_factory=dict, repr=False)

    @property
    def baseline(self) -> dict[str, Any] | None:
        name = self.results.get("baseline")
        return next((v for v in self.variants if v["name"] == name), None) if name else None

    def variant_dir(self, v: dict[str, Any]) -> Path:
        return self.dir / str(v.get("dir") or v["name"])

    def predictions(self, v: dict[str, Any]) -> list[dict[str, Any]]:
        """The variant's ``predictions.jsonl`` records (read once)."""
        if v["name"] not in self._predictions:
            self._predictions[v["name"]] = _read_jsonl(self.variant_dir(v) / "predictions.jsonl")
        return self._predictions[v["name"]]


RunLike = str | os.PathLike | Run


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExperimentError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExperimentError(f"{path}: cannot read JSON ({exc})") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ExperimentError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentError(f"{path}: cannot read ({exc})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExperimentError(f"{path}, line {n}: not JSON ({exc})") from None
        words = rec.get("words") if isinstance(rec, dict) else None
        if (not isinstance(words, dict) or "id" not in rec
                or any(k not in words for k in ("substitutions", "deletions", "insertions", "ref"))):
            raise ExperimentError(f"{path}, line {n}: a record needs 'id' and 'words' with substitutions, "
                                  "deletions, insertions and ref")
        out.append(rec)
    return out


def load_run(run_dir: RunLike) -> Run:
    """Read ``run_dir/results.json`` and each variant's metrics (from results.json, else ``<dir>/metrics.json``)."""
    if isinstance(run_dir, Run):
        return run_dir
    root = Path(run_dir)
    path = root / "results.json"
    results = _read_json(path)
    if not isinstance(results, dict) or not isinstance(results.get("variants"), list):
        raise ExperimentError(f"{path}: expected an object with a 'variants' list")
    variants = []
    for i, v in enumerate(results["variants"]):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise ExperimentError(f"{path}: variants[{i}] needs a 'name'")
        v = dict(v)
        if not isinstance(v.get("metrics"), dict):
            mpath = root / str(v.get("dir") or v["name"]) / "metrics.json"
            v["metrics"] = _read_json(mpath)
            if not isinstance(v["metrics"], dict):
                raise ExperimentError(f"{mpath}: expected a JSON object")
        missing = [k for k in ("wer", "cer", "substitutions", "deletions", "insertions") if k not in v["metrics"]]
        if missing:
            raise ExperimentError(f"{path}: metrics of variant {v['name']!r} lack {', '.join(missing)}")
        variants.append(v)
    return Run(root, results, variants)


def human_bytes(n: float | None) -> str:
    """Decimal units: ``4.61 MB``."""
    if n is None:
        return ""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def _ratio(x: float | None, base: float | None) -> str:
    return "" if x is None or not base else f"{100 * x / base:.1f}%"


def _minus(s: str) -> str:
    return s.replace("-", "−")


def _num(m: dict[str, Any], key: str) -> float | None:
    x = m.get(key)
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def valid_ce(v: dict[str, Any]) -> float | None:
    """A variant's validation CE (teacher-forced cross entropy on the run's ``data.valid``), if it has one: its
    results.json entry's, or (an entry without the key) its metrics'."""
    return _num(v, "valid_ce") if "valid_ce" in v else _num(v.get("metrics") or {}, "valid_ce")


def comparison_rows(run_dir: RunLike, n_resamples: int = 1000, seed: int = 0) -> list[dict[str, str]]:
    """One row per variant (display strings keyed as in ``_HEADERS``): attention, size, KV cache (absolute and
    relative to the baseline), WER/CER, S/D/I, ΔWER in percentage points with its paired-bootstrap 95 % CI,
    P(improve), validation CE (every variant), the fine-tune's best validation loss (its own objective) and
    speed. ΔWER columns are blank when the baseline is not among the variants."""
    run = load_run(run_dir)
    if (n_resamples, seed) in run._rows:  # the bootstrap is computed once per run, whatever prints it
        return run._rows[(n_resamples, seed)]
    base = run.baseline
    bm = base["metrics"] if base else {}
    rows = []
    for v in run.variants:
        m = v["metrics"]
        kv_self, kv_cross = _num(m, "kv_self_bytes_per_token"), _num(m, "kv_cross_bytes_per_utterance")
        params = _num(m, "parameters")
        delta = p_imp = ""
        if base is not None:
            if v is base:
                delta = "baseline"
            else:
                try:
                    b = stats.paired_bootstrap(run.predictions(base), run.predictions(v), n_resamples, seed)
                except ValueError as exc:
                    raise ExperimentError(f"{run.variant_dir(v) / 'predictions.jsonl'} vs "
                                          f"{run.variant_dir(base) / 'predictions.jsonl'}: {exc}") from None
                delta = _minus(f"{100 * b['delta_wer']:+.2f} [{100 * b['ci_low']:+.2f}, "
                               f"{100 * b['ci_high']:+.2f}]")
                p_imp = f"{b['p_improve']:.3f}"
        rows.append({
            "variant": v["name"],
            "attention": attention_label(v.get("attention") or m.get("attention")),
            "params": "" if params is None else f"{params / 1e6:.2f} M",
            "kv_self": _fmt(kv_self, ".0f"),
            "kv_self_utt": human_bytes(_num(m, "kv_self_bytes_per_utterance")),
            "kv_self_rel": _ratio(kv_self, _num(bm, "kv_self_bytes_per_token")),
            "kv_cross": human_bytes(kv_cross),
            "kv_cross_rel": _ratio(kv_cross, _num(bm, "kv_cross_bytes_per_utterance")),
            "wer": pct(m["wer"]),
            "cer": pct(m["cer"]),
            "sdi": f"{m['substitutions']}/{m['deletions']}/{m['insertions']}",
            "delta_wer": delta,
            "p_improve": p_imp,
            "valid_ce": _fmt(valid_ce(v), ".4f"),
            "valid_loss": _fmt(_num(v, "valid_loss"), ".4f"),
            "tokens_per_s": _fmt(_num(m, "decode_tokens_per_second"), ".1f"),
            "rtf": _fmt(_num(m, "real_time_factor"), ".3f"),
        })
    run._rows[(n_resamples, seed)] = rows
    return rows


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _render(headers: list[str], rows: list[list[Any]], fmt: str) -> str:
    _check_fmt(fmt)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(rows)
        return buf.getvalue()
    return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)


def _comparison_from_rows(rows: list[dict[str, str]], fmt: str) -> str:
    ascii_only = fmt in _ASCII_FORMATS
    headers = [h[1] if ascii_only else h[0] for h in _HEADERS.values()]
    cells = [[r[k].replace("−", "-") if ascii_only else r[k] for k in _HEADERS] for r in rows]
    return _render(headers, cells, fmt)


def comparison_table(run_dir: RunLike, fmt: str = "simple", n_resamples: int = 1000, seed: int = 0) -> str:
    """The variants of one run side by side, in ``fmt`` (simple, github, csv or latex)."""
    _check_fmt(fmt)
    return _comparison_from_rows(comparison_rows(run_dir, n_resamples, seed), fmt)


def group_table(run_dir: RunLike, key: str = "voice", fmt: str = "simple") -> str:
    """WER % per ``voice`` or ``source`` group: groups as rows (``group (n utts)``), variants as columns (a run
    has a handful of variants but may have dozens of voices, so this way the table stays readable)."""
    if key not in ("voice", "source"):
        raise ValueError(f"group key must be 'voice' or 'source', got {key!r}")
    _check_fmt(fmt)
    run = load_run(run_dir)
    per = [(v["name"], v["metrics"].get(f"by_{key}") or {}) for v in run.variants]
    groups = sorted({g for _, by in per for g in by})
    sizes = {g: next((by[g].get("utterances") for _, by in per if g in by), None) for g in groups}
    headers = [f"{key} (utts)"] + [name for name, _ in per]
    rows = [[g + (f" ({sizes[g]})" if sizes[g] is not None else "")] + [pct(by[g]["wer"]) if g in by else ""
                                                                         for _, by in per] for g in groups]
    return _render(headers, rows, fmt)


def _spearman_line(pairs: list[tuple[float, float]], what: str, over: str, fewer: str) -> str:
    rho = stats.spearman([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) >= 3 else None
    if len(pairs) < 3:
        corr = f"n/a: {fewer}"
    elif rho is None:
        corr = f"n/a: constant {what} or test WER over {over}"
    else:
        corr = f"{rho:+.3f} over {over}"
    return f"Spearman rank correlation between {what} and test WER: {corr}."


def footer_lines(run_dir: RunLike, n_resamples: int = 1000, seed: int = 0) -> list[str]:
    """How to read the tables: the ΔWER convention, Spearman(validation CE, test WER) over every variant that has
    one and Spearman(fine-tune validation loss, test WER) over the fine-tuned ones, normaliser, decoding, data."""
    run = load_run(run_dir)
    results = run.results
    base = results.get("baseline")
    lines = []
    if run.baseline is not None:
        lines.append(f"ΔWER: percentage points against the baseline {base!r}, 95% CI from a paired bootstrap over "
                     f"utterances ({n_resamples} resamples, seed {seed}); P(improve): share of resamples where the "
                     "variant's WER is lower.")
    else:
        lines.append(f"ΔWER: n/a, the baseline {base!r} is not among the variants.")
    with_ce = [v for v in run.variants if valid_ce(v) is not None]
    n_tuned = sum(bool(v.get("finetuned")) for v in with_ce)
    vset = (results.get("data") or {}).get("validation") or {}
    lines.append(_spearman_line(
        [(valid_ce(v), float(v["metrics"]["wer"])) for v in with_ce], "validation CE",
        f"{len(with_ce)} of {len(run.variants)} variants ({n_tuned} fine-tuned)",
        "fewer than 3 variants have one" if with_ce or vset else "no validation CE (the run had no data.valid)"))
    tuned = [(float(v["valid_loss"]), float(v["metrics"]["wer"])) for v in run.variants
             if _num(v, "valid_loss") is not None]
    objectives = sorted({str(v.get("finetune_objective")) for v in run.variants
                         if _num(v, "valid_loss") is not None and v.get("finetune_objective")})
    lines.append(_spearman_line(tuned, "the fine-tune's best validation loss", f"{len(tuned)} fine-tuned variants",
                                "fewer than 3 fine-tuned variants"))
    losses = []
    if with_ce:
        n = vset.get("utterances", "?")
        where = f"{vset['ref']} ({n} utterance{'' if n == 1 else 's'})" if vset.get("ref") else "data.valid"
        losses.append(f"valid CE: teacher-forced cross entropy per token on the transcripts of {where}, computed "
                      "alike for every variant on its model reloaded from disk")
    if tuned:
        losses.append("FT valid loss: the fine-tune's best validation loss under its own objective ("
                      + (", ".join(objectives) or "see its config") + "), not comparable with valid CE when that "
                      "objective includes distillation")
    if losses:
        lines.append("; ".join(losses) + ".")
    norms = sorted({str(v["metrics"].get("normalizer", "?")) for v in run.variants})
    norm = norms[0] if len(norms) == 1 else "MIXED (WERs not comparable): " + ", ".join(norms)
    dec = results.get("decoding") or {}
    dec_s = ", ".join(f"{k}={v}" for k, v in dec.items()) or "?"
    test = ((results.get("data") or {}).get("test") or {}).get("ref", "?")
    lines.append(f"Normaliser: {norm}; decoding: {dec_s}; test data: {test}.")
    return lines


def write_reports(run_dir: RunLike, n_resamples: int = 1000, seed: int = 0) -> Run:
    """Write ``report.md`` (title, tables in GitHub markdown, footer) and ``report.csv`` (the comparison table) into
    the run directory, atomically. Returns the run, whose comparison rows are now computed (print it with
    :func:`full_report` without a second bootstrap)."""
    run = load_run(run_dir)
    rows = comparison_rows(run, n_resamples, seed)
    title = run.results.get("experiment") or run.dir.name
    parts = [f"# {title}", ""]
    if run.results.get("base_model"):
        parts += [f"Base model: `{run.results['base_model']}`.", ""]
    parts += ["## Variants", "", _comparison_from_rows(rows, "github"), ""]
    for key in ("voice", "source"):
        parts += [f"## WER % by {key}", "", group_table(run, key, "github"), ""]
    parts += [f"- {line}" for line in footer_lines(run, n_resamples, seed)] + [""]
    figures = [f"![{alt}]({name})" for name, alt in (("tradeoff.png", "WER against KV cache"),
                                                       ("loss_vs_wer.png", "validation CE against WER"))
               if (run.dir / name).exists()]
    if figures:
        parts += [" ".join(figures), ""]  # one paragraph: side by side where the page is wide enough
    write_text(run.dir / "report.md", "\n".join(parts))
    write_text(run.dir / "report.csv", _comparison_from_rows(rows, "csv"))
    return run


def full_report(run_dir: RunLike, fmt: str = "simple", n_resamples: int = 1000, seed: int = 0) -> str:
    """Everything ``mla-registry report`` prints: the comparison, WER per voice and per source, the footer."""
    run = load_run(run_dir)
    parts = [comparison_table(run, fmt, n_resamples=n_resamples, seed=seed)]
    for key in ("voice", "source"):
        parts += ["", f"WER % by {key}", group_table(run, key, fmt)]
    return "\n".join(parts + [""] + footer_lines(run, n_resamples=n_resamples, seed=seed))
