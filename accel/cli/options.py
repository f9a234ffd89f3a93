"""Command-line options that several commands share (``accel run`` and ``accel serve``): where the
workers run and how they accelerate the pipeline. Each is a typer option object used as a parameter's
default; typer reads it and builds a fresh click option per command.
"""

from __future__ import annotations

import typer

from accel.cli.common import choices
from accel.request import SCHEDULE_NAMES
from accel.settings import AcceleratorKind, Backend, Precision, Strategy, WindowGuidance
from accel.source import DEMOS

DEMO = typer.Option(None, "--demo", help=f"A built-in tiny pipeline (no download, CPU): {choices(DEMOS)}.")
DEVICES = typer.Option(
    None,
    "--devices",
    min=1,
    help="Processes (one device each) on this node (default: the plan's, else 2).",
)
NUM_NODES = typer.Option(1, "--num-nodes", min=1, help="Nodes taking part (same command on each).")
NODE_RANK = typer.Option(0, "--node-rank", min=0, help="This node's index; node 0 hosts the rendezvous.")
MASTER_ADDR = typer.Option("127.0.0.1", "--master-addr", help="Address of node 0.")
MASTER_PORT = typer.Option(
    None, "--master-port", min=1, max=65535, help="Free port on node 0 (required with --num-nodes > 1)."
)
ACCELERATOR = typer.Option(
    "auto", "--accelerator", help=f"{choices(AcceleratorKind)} (cpu: gloo, cuda: NCCL)."
)
PRECISION = typer.Option(None, "--precision", help=f"{choices(Precision)} (default: the plan's or model's).")
STRATEGY = typer.Option(
    None, "--strategy", help=f"{choices(Strategy)} (default: hybrid with a plan, else cfg)."
)
WINDOW_GUIDANCE = typer.Option(
    None, "--window-guidance", help=f"Guidance in the pipelined window: {choices(WindowGuidance)}."
)
SCHEDULE = typer.Option(
    None, "--schedule", help=f"When to pipeline (hybrid): {', '.join(SCHEDULE_NAMES)} or START-END."
)
BACKEND = typer.Option(None, "--backend", help=f"{choices(Backend)} (default: the engines', else eager).")
ENGINES = typer.Option(None, "--engines", help="An engine directory written by `accel export`.")
STRICT = typer.Option(
    None,
    "--strict",
    help="Fail when a stage cannot load from --engines or compile, instead of compiling it in memory or "
    "running it eagerly.",
)
COMPILE_MISSING = typer.Option(
    None,
    "--compile-missing",
    help="With --engines: compile in memory the stages the directory cannot serve (else refused).",
)
