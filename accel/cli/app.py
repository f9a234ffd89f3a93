"""The ``accel`` command line: one typer app, one module per command.

Each command module parses its options and calls the library; this module registers them. Command
modules import only typer, rich and accel's light modules at the top (settings, sources): ``accel --help``
imports them all and must stay fast.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

import typer

from accel.cli import bench, doctor, export, inspect, plan, run, serve
from accel.proctree import end_descendants

#: The signals a command stops on with a one-line message and exit status ``128 + signum``.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

app = typer.Typer(
    name="accel",
    help="Hybrid data-pipeline parallelism for diffusers pipelines: plan, export, run, serve, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("bench")(bench.bench)
app.command("doctor")(doctor.doctor)
app.command("export")(export.export)
app.command("inspect")(inspect.inspect)
app.command("plan")(plan.plan)
app.command("run", help=run.HELP, context_settings={"allow_extra_args": True})(run.run)
app.command("serve", help=serve.HELP)(serve.serve)


def main() -> None:
    """Console-script entry point: runs a command; Ctrl-C or SIGTERM stops it with one line."""
    received: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        # SystemExit unwinds through every finally (the launcher stops the workers on the way out) and no
        # `except Exception` swallows it; files are written atomically, so nothing is left half-written.
        raise SystemExit(128 + signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        app()
    finally:
        if received:
            # Compile workers stopped mid-job may outlive this process and keep every core busy.
            end_descendants(os.getpid())
            name = signal.Signals(received[0]).name
            typer.echo(f"accel: interrupted ({name}), stopped.", err=True)
