"""The figures of one run: test WER against KV-cache bytes per utterance with the Pareto front (``tradeoff.png``),
test WER against validation CE (``loss_vs_wer.png``), fine-tuning curves (``curves.png``). matplotlib (the
optional ``plot`` extra) is imported lazily, Agg canvas only, no pyplot state."""

from __future__ import annotations

import io
from collections.abc import Collection
from pathlib import Path
from typing import Any

from . import stats
from .atomic import write_bytes
from .errors import ExperimentError
from .report import RunLike, load_run, valid_ce

INSTALL_HINT = "pip install 'mla-registry[plot]' to draw tradeoff.png and loss_vs_wer.png"


def kv_bytes_per_utterance(metrics: dict[str, Any]) -> float | None:
    """Cross-attention bytes per utterance + what the self-attention cache held at the end of the utterance
    (older metrics without that figure: bytes per token x mean generated tokens)."""
    cross, self_ = metrics.get("kv_cross_bytes_per_utterance"), metrics.get("kv_self_bytes_per_token")
    if cross is None or self_ is None:
        return None
    held = metrics.get("kv_self_bytes_per_utterance")
    if held is not None:
        return float(cross) + float(held)
    tokens, utts = metrics.get("generated_tokens"), metrics.get("utterances")
    mean_tokens = tokens / utts if tokens is not None and utts else 0.0
    return float(cross) + float(self_) * mean_tokens


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (bytes, wer) that no other point beats on both (fewer or equal bytes and lower WER),
    in order of increasing bytes."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best = float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_bytes(out, buf.getvalue())
    return out


def curves_plot(run_dir: RunLike) -> Path | None:
    """Draw ``run_dir/curves.png``: training and validation loss against step for every fine-tuned variant (read
    from each checkpoint's provenance). ``None`` when no variant was fine-tuned or matplotlib is missing."""
    from . import checkpoint

    run = load_run(run_dir)
    curves = []
    for v in run.variants:
        ckpt = run.variant_dir(v) / "checkpoint"
        if checkpoint.is_checkpoint(ckpt):
            finetunes = checkpoint.provenance_of(checkpoint.read_manifest(ckpt) or {}).finetunes
            if finetunes and finetunes[-1].get("curve"):
                curves.append((v["name"], finetunes[-1]["curve"]))
    fig = _figure() if curves else None
    if fig is None:
        return None
    ax = fig.add_subplot()
    colours = [f"C{i}" for i in range(10)]
    for i, (name, curve) in enumerate(curves):
        colour = colours[i % len(colours)]
        ax.plot([c["step"] for c in curve], [c["valid_loss"] for c in curve], "-o", color=colour, markersize=3,
                label=f"{name} valid")
        train = [(c["step"], c["train_loss"]) for c in curve if c.get("train_loss") is not None]
        if train:
            ax.plot(*zip(*train), "--", color=colour, alpha=0.6, label=f"{name} train")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (per token)")
    ax.set_title(f"{run.results.get('experiment') or run.dir.name}: fine-tuning")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, run.dir / "curves.png")


def _labelled_points(ax, names: list[str], pts: list[tuple[float, float]], base: str | None,
                     hollow: Collection[str] = ()) -> None:
    """One labelled point per variant; the baseline a red star, the ``hollow`` names drawn as rings."""
    for name, (x, y) in zip(names, pts):
        is_base = name == base
        colour = "tab:red" if is_base else "tab:blue"
        ax.scatter([x], [y], marker="*" if is_base else "o", s=160 if is_base else 40, zorder=2,
                   color="none" if name in hollow and not is_base else colour, edgecolors=colour,
                   label="baseline" if is_base else None)
        ax.annotate(name + (" (baseline)" if is_base else ""), (x, y), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)


def loss_vs_wer_plot(run_dir: RunLike) -> Path | None:
    """Draw ``run_dir/loss_vs_wer.png`` (written atomically): test WER against validation CE, one labelled point
    per variant (baseline starred, fine-tuned variants as rings), Spearman's rho in the title. ``None`` when no
    variant has a validation CE (the run had no ``data.valid``) or matplotlib is missing."""
    run = load_run(run_dir)
    rows = [(v["name"], ce, 100 * float(v["metrics"]["wer"]), bool(v.get("finetuned")))
            for v in run.variants if (ce := valid_ce(v)) is not None]
    fig = _figure() if rows else None
    if fig is None:
        return None
    ax = fig.add_subplot()
    names, pts = [r[0] for r in rows], [(r[1], r[2]) for r in rows]
    base = run.results.get("baseline")
    _labelled_points(ax, names, pts, base, hollow={r[0] for r in rows if r[3]})
    for tuned, label in ((False, "not fine-tuned"), (True, "fine-tuned")):
        if any(r[3] == tuned and r[0] != base for r in rows):  # legend entries for the two kinds of point
            ax.scatter([], [], marker="o", color="none" if tuned else "tab:blue", edgecolors="tab:blue",
                       label=label)
    rho = stats.spearman([p[0] for p in pts], [p[1] for p in pts])
    vset = (run.results.get("data") or {}).get("validation") or {}
    ax.set_xlabel(f"validation CE per token (teacher-forced, {vset.get('ref', 'data.valid')})")
    ax.set_ylabel("test WER (%)")
    ax.set_title(f"{run.results.get('experiment') or run.dir.name}: Spearman "
                 + (f"{rho:+.3f}" if rho is not None else "n/a") + f" over {len(pts)} variants")
    ax.margins(0.1)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, run.dir / "loss_vs_wer.png")


def tradeoff_plot(run_dir: RunLike) -> Path | None:
    """Draw ``run_dir/tradeoff.png`` (written atomically) and return its path; ``None`` when matplotlib is not
    installed (print :data:`INSTALL_HINT` then)."""
    fig = _figure()
    if fig is None:
        return None
    run = load_run(run_dir)
    base = run.results.get("baseline")
    names, pts = [], []
    for v in run.variants:
        x = kv_bytes_per_utterance(v["metrics"])
        if x is not None:
            names.append(v["name"])
            pts.append((x / 1e6, 100 * float(v["metrics"]["wer"])))
    if not pts:
        raise ExperimentError(f"{run.dir / 'results.json'}: no variant has KV-cache figures to plot")

    ax = fig.add_subplot()
    front = pareto_front(pts)
    if len(front) > 1:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-", color="tab:green", alpha=0.6,
                label="Pareto front", zorder=1)
    _labelled_points(ax, names, pts, base)
    xs = [p[0] for p in pts]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("KV cache per utterance (MB) = cross bytes + self bytes/token × mean generated tokens")
    ax.set_ylabel("test WER (%)")
    ax.set_title(str(run.results.get("experiment") or run.dir.name))
    ax.margins(0.1)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)

    return _save(fig, run.dir / "tradeoff.png")
