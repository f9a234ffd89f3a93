"""The ``accel`` command line: one typer app, one module per command.

Each command module parses its options and calls the library; this module registers them. Command
modules import only typer, rich and accel's light modules at the top (settings, sources): ``accel --help``
imports them all and must stay fast.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

import typer

from accel.cli import bench, doctor, export, inspect, plan, run, serve
from accel.proctree import end_descendants

#: The signals a command stops on with a one-line message and exit status ``128 + signum``.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds a stopped command gets to end (a server's drain, the workers' shutdown) before it is ended.
STOP_GRACE_S = 60.0

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


def main(stop_grace_s: float = STOP_GRACE_S) -> None:
    """Console-script entry point: runs a command; Ctrl-C or SIGTERM stops it with one line.

    The stop raises ``SystemExit`` wherever the command is. Code that catches every exception (a
    library's catch-all) can swallow it: the signal is then delivered again at once, and a command still
    running ``stop_grace_s`` after the stop (longer than any drain or worker shutdown takes) has its
    children ended and exits with the same status, so a stop never leaves a command running.
    """
    received: list[int] = []
    ended, swallowed = threading.Event(), threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        if not received:
            args = (signum, ended, swallowed, stop_grace_s)
            threading.Thread(target=_insist, args=args, name="accel-stop", daemon=True).start()
        received.append(signum)
        # SystemExit unwinds through every finally (the launcher stops the workers on the way out) and no
        # `except Exception` swallows it; files are written atomically, so nothing is left half-written.
        raise _Stop(128 + signum, swallowed)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        app()
    finally:
        ended.set()
        if received:
            # Compile workers stopped mid-job may outlive this process and keep every core busy.
            end_descendants(os.getpid())
            typer.echo(_stopped(received[0]), err=True)
            # The signal's status even when the stop was swallowed and the command then ended on its own.
            raise SystemExit(128 + received[0])


class _Stop(SystemExit):
    """A stop's ``SystemExit``. Freed before the command ended, it was swallowed: it says so."""

    def __init__(self, code: int, swallowed: threading.Event) -> None:
        super().__init__(code)
        self._swallowed = swallowed

    def __del__(self) -> None:
        self._swallowed.set()


def _stopped(signum: int) -> str:
    return f"accel: interrupted ({signal.Signals(signum).name}), stopped."


def _insist(signum: int, ended: threading.Event, swallowed: threading.Event, grace_s: float) -> None:
    """Makes a stop happen: delivers the signal again each time its ``SystemExit`` was swallowed, and ends
    the process outright if the command has not ended ``grace_s`` after the stop."""
    deadline = time.monotonic() + grace_s
    while not ended.is_set() and (left := deadline - time.monotonic()) > 0:
        if swallowed.wait(min(left, 0.1)):
            swallowed.clear()
            if not ended.is_set():
                os.kill(os.getpid(), signum)
    if ended.is_set():
        return
    end_descendants(os.getpid())
    sys.stdout.flush()
    sys.stderr.write(_stopped(signum) + "\n")
    sys.stderr.flush()
    os._exit(128 + signum)
