"""Helpers shared by the commands: choices for help texts, errors, the plan table.

Nothing heavy is imported here (``accel --help`` imports every command module).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NoReturn, get_args

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from accel.atomic import unwritable_reason
from accel.quiet import quiet_third_party

#: Device kinds a command that loads a model on this machine accepts.
DEVICE_KINDS = ("cuda", "cpu")


def choices(values: Any) -> str:
    """``"a, b or c"`` for a ``Literal`` type or a tuple of choices, for help texts."""
    names = [str(v) for v in (get_args(values) or values)]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def fail(console: Console, message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` and exit with ``code`` (2: bad input; 1: the work failed)."""
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def check_writable(console: Console, path: Path) -> None:
    """Refuse (exit 2) an ``--output`` that cannot be written, before any work starts."""
    reason = unwritable_reason(path)
    if reason is not None:
        fail(console, f"--output {path}: {reason}.")


def log_to(console: Console) -> None:
    """Send accel's and the elastic launcher's records to the console (the CLI owns this process)."""
    from rich.logging import RichHandler

    logging.getLogger("accel").setLevel(logging.INFO)
    logging.getLogger("accel.launch").setLevel(logging.DEBUG)  # includes the elastic launcher's records
    logging.getLogger("accel").addHandler(RichHandler(console=console, show_path=False))


def set_verbosity(console: Console, verbose: bool) -> None:
    """``-v``: accel's and the launcher's records on ``console``; otherwise silence the third-party
    messages a user cannot act on (:func:`accel.quiet.quiet_third_party`)."""
    if verbose:
        log_to(console)
    else:
        quiet_third_party()


def check_device(device: str) -> None:
    """Refuse a ``--device`` that is not cuda or cpu, or cuda on a machine without one."""
    import torch  # deferred: only commands that load a model get here

    if device not in DEVICE_KINDS:
        raise typer.BadParameter(f"--device {device!r} is not cuda or cpu.")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda: no CUDA device is available here; use --device cpu.")


def _segments(segments: Any) -> str:
    return ", ".join(f"{lo}-{hi - 1}" if hi - lo > 1 else f"{lo}" for lo, hi in segments)


def plan_table(plan: Any, output: Any = None) -> Table:
    """A rich table of a plan's stages (``accel plan`` and ``accel inspect``)."""
    title = (
        f"accel plan: {plan.model_class} ({len(plan.units)} units), {plan.resolutions[0][0]}x"
        f"{plan.resolutions[0][1]}, batch {plan.batches[0]}, {plan.dtype} on {plan.profile.get('device_name')}, "
        f"{plan.devices} stage(s), {plan.layout}"
    )
    table = Table(title=title)
    for column, justify in (
        ("stage", "right"),
        ("units", "left"),
        ("n", "right"),
        ("ms", "right"),
        ("share", "right"),
        ("boundary MB", "right"),
        ("GFLOP", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    total = sum(s.cost_ms for s in plan.stages) or 1.0
    for k, stage in enumerate(plan.stages):
        table.add_row(
            str(k),
            _segments(stage.segments),
            str(len(stage.units())),
            f"{stage.cost_ms:.3f}",
            f"{100 * stage.cost_ms / total:.1f}%",
            f"{(stage.bytes_in + stage.bytes_out) / 1e6:.3f}",
            f"{stage.flops / 1e9:.2f}",
        )
    table.caption = (
        f"balance (max/mean) {plan.balance:.3f}; {plan.bytes_per_step / 1e6:.3f} MB cross stages per step "
        f"({len(plan.boundary)} tensors)" + (f"; wrote {output}" if output is not None else "")
    )
    return table
