"""The ``accel`` command line: one typer app, one module per command."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="accel",
    help="Hybrid data-pipeline parallelism for diffusers pipelines: plan, export, run, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each command lives in its own module; importing it adds the command to ``app``.
    from accel.cli import bench, doctor, export, inspect, plan, run, serve  # noqa: F401


def main() -> None:
    """Console-script entry point."""
    _register()
    app()
