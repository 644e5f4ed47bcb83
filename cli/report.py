"""``mla-registry report``: compare the variants of one run from what the run wrote to disk."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["simple", "github", "csv", "latex"]), default="simple",
              show_default=True, help="Table format.")
@click.option("--resamples", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Paired-bootstrap resamples for the ΔWER confidence intervals.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option("--write", is_flag=True,
              help="Also write report.md, report.csv, tradeoff.png and loss_vs_wer.png into RUN_DIR.")
def command(run_dir, fmt, resamples, seed, write) -> None:
    """Print the comparison of a run's variants (WER, CER, ΔWER with a 95% CI against the baseline, KV cache,
    parameters, validation CE, speed), WER per voice and per source, and a footer. Reads results.json, metrics and
    predictions.jsonl from RUN_DIR; no model is loaded and nothing is transcribed again.

    \b
    Examples:
      mla-registry report runs/default
      mla-registry report runs/default --format github --write
    """
    from mla_registry import report

    run = report.load_run(run_dir)
    click.echo(report.full_report(run, fmt, n_resamples=resamples, seed=seed))
    if write:
        from mla_registry.plot import INSTALL_HINT, loss_vs_wer_plot, tradeoff_plot

        png = tradeoff_plot(run)
        loss_png = loss_vs_wer_plot(run)
        report.write_reports(run, n_resamples=resamples, seed=seed)
        click.echo(f"wrote {run.dir / 'report.md'} and {run.dir / 'report.csv'}")
        click.echo(f"wrote {png}" if png else INSTALL_HINT)
        if loss_png:
            click.echo(f"wrote {loss_png}")
