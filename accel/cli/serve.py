"""``accel serve``: launch the worker group once and serve images over HTTP from rank 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from accel.cli import options
from accel.cli.common import fail, set_verbosity
from accel.compile.loader_check import start_background_check
from accel.errors import AccelError
from accel.request import GenerationRequest

HELP = """Serve a pipeline over HTTP: the workers start once, warm up, and stay up.

TARGET is a plan file or a diffusers pipeline folder (or hub id), as in `accel run`; --demo sdxl|sd3
serves a built-in tiny pipeline. Rank 0 answers POST /v1/images/generations (OpenAI images API),
GET /v1/models, /health, /metrics and a page at /. SIGTERM or Ctrl-C drains and exits 0.
Needs the serve extra: pip install 'accel\\[serve]'.

\b
  accel serve --demo sdxl --devices 2 --accelerator cpu --port 8000
  accel serve sdxl-1024.plan.json --engines engines/ --max-batch 4 --host 0.0.0.0
  accel serve ./sdxl-folder --devices 1 --size 1024x1024 --size 1344x768
"""


def serve(
    target: str = typer.Argument(
        None, help="A plan file, or a diffusers model folder or hub id.", show_default=False
    ),
    demo: str = options.DEMO,
    host: str = typer.Option("127.0.0.1", "--host", help="Address the HTTP server listens on."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port of the HTTP server."),
    size: list[str] = typer.Option(
        None,
        "--size",
        help="A size WxH to serve; repeat for several (default: the plan's, else the model's).",
    ),
    max_batch: int = typer.Option(4, "--max-batch", min=1, help="Images per pipeline call at most."),
    batch_wait_ms: float = typer.Option(
        10.0, "--batch-wait-ms", min=0.0, help="How long a request waits for others to share its call."
    ),
    queue: int = typer.Option(64, "--queue", min=1, help="Requests that may wait; one more gets 429."),
    steps: int = typer.Option(20, "--steps", min=1, help="Denoising steps when a request does not say."),
    max_steps: int = typer.Option(100, "--max-steps", min=1, help="The most steps a request may ask for."),
    guidance: float = typer.Option(5.0, "--guidance", help="Guidance scale when a request does not say."),
    drain_timeout: float = typer.Option(
        20.0,
        "--drain-timeout",
        help="After SIGTERM, seconds queued and running requests may take (at most 25).",
    ),
    max_restarts: int = typer.Option(
        0, "--max-restarts", min=0, help="Restart the workers this often after one fails (0: exit)."
    ),
    model_name: str = typer.Option(
        None, "--model-name", help="The model id /v1/models lists (default: the model's name)."
    ),
    devices: int = options.DEVICES,
    num_nodes: int = options.NUM_NODES,
    node_rank: int = options.NODE_RANK,
    master_addr: str = options.MASTER_ADDR,
    master_port: int = options.MASTER_PORT,
    accelerator: str = options.ACCELERATOR,
    precision: str = options.PRECISION,
    strategy: str = options.STRATEGY,
    window_guidance: str = options.WINDOW_GUIDANCE,
    schedule: str = options.SCHEDULE,
    backend: str = options.BACKEND,
    engines: Path = options.ENGINES,
    strict: bool = options.STRICT,
    compile_missing: bool = options.COMPILE_MISSING,
    timeout: float = typer.Option(
        300.0,
        "--timeout",
        min=1.0,
        help="Seconds one collective (and joining the group) may wait; idle time is unlimited.",
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Log the workers' steps and every HTTP request."
    ),
) -> None:
    # The engines' loader check runs beside this process's own imports (torch, diffusers).
    checking = start_background_check(engines)  # noqa: F841  (held while it runs)
    # Deferred: these import torch and diffusers, which `accel --help` must not wait for.
    from accel.jobs import Layout
    from accel.serve import require_extra
    from accel.serve.job import serve_job

    console = Console(stderr=True, soft_wrap=True)
    set_verbosity(console, verbose)
    request = GenerationRequest(
        precision=precision,
        strategy=strategy,
        window_guidance=window_guidance,
        schedule=schedule,
        backend=backend,
        engines=engines,
        strict=strict,
        compile_missing=compile_missing,
    )
    server = dict(
        host=host,
        port=port,
        model_name=model_name,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        queue=queue,
        default_steps=steps,
        max_steps=max_steps,
        default_guidance=guidance,
        drain_timeout_s=drain_timeout,
    )
    try:
        require_extra()
        layout = Layout(devices, num_nodes, node_rank, master_addr, master_port, accelerator, timeout)
        job, spec = serve_job(
            target,
            demo,
            request,
            layout,
            server,
            sizes=size or [],
            max_restarts=max_restarts,
            verbose=verbose,
        )
    except AccelError as exc:
        fail(console, str(exc))
    _serve(console, job, spec)


def _serve(console: Console, job: Any, spec: Any) -> None:
    from accel.launch import LaunchError
    from accel.serve.worker import launch_server  # deferred: imports torch

    s = job.serve
    if spec.node_rank == 0:
        console.print(
            f"accel serve: {s.model_name} on http://{s.host}:{s.port}, {spec.world_size} process(es), strategy "
            f"{job.settings['strategy']}, backend {job.settings['backend']} (starting; /health says when warm)",
            highlight=False,
        )
    try:
        launch_server(job, spec)
    except LaunchError as exc:
        ranks = "; ".join(f"rank {rank}: {error}" for rank, error in sorted(exc.failures.items()))
        fail(console, f"the server stopped because a worker failed ({ranks or exc}).", code=1)
    console.print("accel serve: drained and stopped", highlight=False)
