"""``accel bench``: measure accel. ``--quality`` runs the quality suite (:mod:`accel.bench.quality`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from accel.cli.app import app

SUITES = ("--quality",)


@app.command("bench")
def bench(
    quality: bool = typer.Option(
        False,
        "--quality",
        help="Quality suite: the trained digit models, exact vs CFG split vs every hybrid window mode "
        "(2 CPU processes).",
    ),
    family: list[str] = typer.Option(
        ["sdxl", "sd3"], "--family", help="Quality model family (repeat for several): sdxl, sd3."
    ),
    seeds: int = typer.Option(10, "--seeds", min=1, help="Seeds per digit (each seed generates 0-9)."),
    steps: int = typer.Option(50, "--steps", min=2, help="Denoising steps per call."),
    weights: Path = typer.Option(
        None, "--weights", help="Folder with trained quality models (default: the committed ones)."
    ),
    output: Path = typer.Option(
        Path("docs/benchmarks/quality"), "--output", "-o", help="Where the JSON, markdown and PNGs go."
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the PNG figures (matplotlib)."),
) -> None:
    """Measure accel: pick a suite (``--quality``)."""
    console = Console()
    if not quality:
        raise typer.BadParameter(f"choose a suite: {', '.join(SUITES)}.")
    from accel.bench.quality import FAMILIES, run_quality, write_report

    unknown = sorted(set(family) - set(FAMILIES))
    if unknown:
        raise typer.BadParameter(f"--family {', '.join(unknown)}: choose from {', '.join(FAMILIES)}.")
    with console.status("running the quality suite (exact, CFG split, hybrid modes) ..."):
        report = run_quality(family, seeds=range(seeds), steps=steps, root=weights, keep_images=plots)
    written = write_report(report, output, plots=plots)
    for result in report.families:
        table = Table(title=f"{result.family}: {10 * seeds} samples, {steps} steps")
        table.add_column("mode", no_wrap=True)
        for column in ("window", "accuracy", "p(requested)", "agrees", "PSNR mean/min dB", "latent MAE"):
            table.add_column(column)
        for r in result.modes:
            window = f"{r.window[0]}-{r.window[1]}" if r.window is not None else ""
            table.add_row(
                r.name,
                window,
                f"{100 * r.accuracy:.0f} %",
                f"{r.confidence:.4f}",
                f"{100 * r.agreement:.0f} %",
                f"{r.psnr_mean_db:.1f} / {r.psnr_min_db:.1f}",
                f"{r.latent_mae:.4f}",
            )
        console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in written))
