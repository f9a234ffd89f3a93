"""``accel inspect``: show what a plan file holds and whether it is valid."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from accel.cli.app import app


@app.command("inspect")
def inspect(
    path: Path = typer.Argument(..., help="A plan file written by `accel plan`."),
    as_json: bool = typer.Option(False, "--json", help="Print the validated plan as JSON."),
) -> None:
    """Show a plan's stages, costs and boundary tensors (a plan that fails validation exits 1)."""
    from accel.cli.plan import plan_table
    from accel.plan import PlanError, load_plan

    console = Console()
    try:
        plan = load_plan(path)
    except (PlanError, OSError) as exc:
        console.print(f"[red]invalid:[/red] {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(plan.to_dict(), indent=2))
        return
    console.print(plan_table(plan))
    console.print(f"source: {plan.source}; strategy {plan.strategy}, backend {plan.backend}")
    for edge in plan.boundary:
        console.print(
            f"  {edge.name}: unit {edge.producer} -> {edge.consumer}, {list(edge.shape)} {edge.dtype}, "
            f"{edge.nbytes / 2**20:.2f} MiB"
        )
