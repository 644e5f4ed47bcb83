"""``mla-registry run``: every variant of an experiments YAML through the same evaluation."""

from __future__ import annotations

import click

from mla_registry.report import FORMATS

from .options import quiet_option


@click.command("run")
@click.argument("config", type=click.Path(dir_okay=False), default="experiments.yaml", required=False)
@click.option("--force", is_flag=True, help="Recompute every variant, even those already finished.")
@click.option("--check", is_flag=True, help="Only validate the YAML (plugins, kwargs, slots, datasets).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="simple", show_default=True,
              help="Table format.")
@quiet_option
def command(config: str, force: bool, check: bool, fmt: str, quiet: bool) -> None:
    """Convert (and fine-tune) every variant named in CONFIG, save each as a checkpoint, reload it from disk,
    evaluate all of them on the same test set with the same decoding, and print the comparison.

    Interrupted runs resume: finished variants are not recomputed. Outputs go to <output_dir>/<name>/.

    \b
    Examples:
      mla-registry run experiments.yaml
      mla-registry run experiments.yaml --check
      mla-registry run my-study.yaml --force --quiet
      torchrun --nproc-per-node 2 -m mla_registry.cli.main run experiments.yaml
    """
    from mla_registry import distributed, experiments, runner

    exp = experiments.load(config)
    if check:
        click.echo(f"{config}: OK ({len(exp.variants)} variants; outputs in {exp.run_dir})")
        return
    world, exp.device = distributed.setup(exp.device)  # under torchrun: one process per rank/GPU
    results = runner.run(exp, force=force, quiet=quiet or not world.is_main)
    if not world.is_main:
        return
    from mla_registry import report

    click.echo(report.full_report(results["report"], fmt))
    reuse = results["encoder_reuse"]
    click.echo(f"\nwrote {exp.run_dir}/results.json, report.md, report.csv")
    click.echo(f"{results['wall_seconds_this_invocation']:.0f} s this run, {results['audio_hours']:.3f} h of test "
               f"audio per variant, peak RSS {results['peak_rss_bytes'] / 2**30:.2f} GiB; encoder batches computed "
               f"{reuse['computed_batches']}, reused {reuse['reused_batches']} (in memory up to "
               f"{reuse['budget_bytes'] / 2**30:.1f} GiB, peak {reuse['peak_memory_bytes'] / 2**30:.2f}; spilled to "
               f"disk {reuse['spilled_batches']}, recomputed {reuse['recomputed_batches']}); calibration passes "
               f"{results['calibration_passes']['captured']}, reused {results['calibration_passes']['reused']}")
    if results.get("tradeoff_png"):
        click.echo(f"wrote {results['tradeoff_png']}")
        if results.get("loss_vs_wer_png"):
            click.echo(f"wrote {results['loss_vs_wer_png']}")
    else:
        from mla_registry.plot import INSTALL_HINT

        click.echo(INSTALL_HINT)
