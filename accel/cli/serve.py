"""``accel serve``: launch the worker group once and serve images over HTTP from rank 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from accel.cli.app import app
from accel.cli.run import (
    RunInputError,
    Target,
    _fail,
    _launch_spec,
    _log_to,
    _Where,
    resolve_target,
    worker_settings,
)

_HELP = """Serve a pipeline over HTTP: the workers start once, warm up, and stay up.

TARGET is a plan file or a diffusers pipeline folder (or hub id), as in `accel run`; --demo sdxl|sd3
serves a built-in tiny pipeline. Rank 0 answers POST /v1/images/generations (OpenAI images API),
GET /v1/models, /health, /metrics and a page at /. SIGTERM or Ctrl-C drains and exits 0.
Needs the serve extra: pip install 'accel\\[serve]'.

\b
  accel serve --demo sdxl --devices 2 --accelerator cpu --port 8000
  accel serve sdxl-1024.plan.json --engines engines/ --max-batch 4 --host 0.0.0.0
  accel serve ./sdxl-folder --devices 1 --size 1024x1024 --size 768x1344
"""


def _model_name(tgt: Target) -> str:
    source = tgt.source or {}
    if source.get("kind") == "folder":
        return Path(str(source["path"])).name
    return str(source.get("name") or source.get("id") or tgt.label)


@app.command("serve", help=_HELP)
def serve(
    target: str = typer.Argument(
        None, help="A plan file, or a diffusers model folder or hub id.", show_default=False
    ),
    demo: str = typer.Option(
        None, "--demo", help="A built-in tiny pipeline (no download, CPU): sdxl or sd3."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the HTTP server listens on."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port of the HTTP server."),
    size: list[str] = typer.Option(
        None,
        "--size",
        help="A size WxH to serve (repeat for several; default: the plan's, else the model's).",
    ),
    max_batch: int = typer.Option(4, "--max-batch", min=1, help="Images per pipeline call at most."),
    batch_wait_ms: float = typer.Option(
        10.0, "--batch-wait-ms", min=0.0, help="How long a request waits for others to batch with."
    ),
    queue: int = typer.Option(64, "--queue", min=1, help="Requests that may wait; one more gets 429."),
    steps: int = typer.Option(20, "--steps", min=1, help="Denoising steps when a request does not say."),
    max_steps: int = typer.Option(100, "--max-steps", min=1, help="The most steps a request may ask for."),
    guidance: float = typer.Option(5.0, "--guidance", help="Guidance scale when a request does not say."),
    drain_timeout: float = typer.Option(
        20.0, "--drain-timeout", help="After SIGTERM, seconds queued and running requests may take."
    ),
    max_restarts: int = typer.Option(
        0, "--max-restarts", min=0, help="Restart the workers this often after one fails (0: exit)."
    ),
    model_name: str = typer.Option(
        None, "--model-name", help="The model id /v1/models lists (default: the model's)."
    ),
    devices: int = typer.Option(
        None,
        "--devices",
        min=1,
        help="Processes (one device each) on this node (default: the plan's, else 2).",
    ),
    num_nodes: int = typer.Option(1, "--num-nodes", min=1, help="Nodes taking part (same command on each)."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's index; node 0 serves HTTP."),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="Address of node 0."),
    master_port: int = typer.Option(
        None, "--master-port", min=1, max=65535, help="Free port on node 0 (required with --num-nodes > 1)."
    ),
    accelerator: str = typer.Option("auto", "--accelerator", help="auto, cpu (gloo) or cuda (NCCL)."),
    precision: str = typer.Option(
        None, "--precision", help="fp32, fp16 or bf16 (default: the plan's or model's)."
    ),
    strategy: str = typer.Option(
        None, "--strategy", help="cfg or hybrid (default: hybrid with a plan, else cfg)."
    ),
    window_guidance: str = typer.Option(
        None, "--window-guidance", help="Guidance in the pipelined window: reference, cached or off."
    ),
    schedule: str = typer.Option(
        None, "--schedule", help="When to pipeline (hybrid): adaptive, always, never or START-END."
    ),
    backend: str = typer.Option(
        None, "--backend", help="eager, inductor, aot, onnx or tensorrt (default: the engines', else eager)."
    ),
    engines: Path = typer.Option(None, "--engines", help="An engine directory written by `accel export`."),
    strict: bool = typer.Option(
        None, "--strict", help="Fail when a stage cannot compile instead of running it eagerly."
    ),
    timeout: float = typer.Option(
        300.0,
        "--timeout",
        min=1.0,
        help="Seconds one collective (and joining the group) may wait; idle time is not limited.",
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Log the workers' steps and every HTTP request."
    ),
) -> None:
    console = Console(stderr=True, soft_wrap=True)
    from accel.serve import MissingExtraError, require_extra

    try:
        require_extra()
    except MissingExtraError as exc:
        _fail(console, str(exc))
    if verbose:
        _log_to(console)
    options: dict[str, Any] = dict(
        precision=precision,
        strategy=strategy,
        window_guidance=window_guidance,
        schedule=schedule,
        backend=backend,
        engines=engines,
        strict=strict,
    )
    server: dict[str, Any] = dict(
        host=host,
        port=port,
        size=size,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        queue=queue,
        steps=steps,
        max_steps=max_steps,
        guidance=guidance,
        drain_timeout=drain_timeout,
        max_restarts=max_restarts,
        model_name=model_name,
    )
    where = _Where(devices, num_nodes, node_rank, master_addr, master_port, accelerator, timeout)
    try:
        job, spec = _serve_job(target, demo, options, server, where, verbose=verbose)
    except RunInputError as exc:
        _fail(console, str(exc))
    from accel.launch import LaunchError
    from accel.serve.worker import launch_server

    s = job.serve
    if node_rank == 0:
        console.print(
            f"accel serve: {s.model_name} on http://{s.host}:{s.port}, {spec.world_size} process(es), strategy "
            f"{job.settings['strategy']}, backend {job.settings['backend']} (starting; /health says when warm)",
            highlight=False,
        )
    try:
        launch_server(job, spec)
    except LaunchError as exc:
        ranks = "; ".join(f"rank {rank}: {error}" for rank, error in sorted(exc.failures.items()))
        _fail(console, f"the server stopped because a worker failed ({ranks or exc}).", code=1)
    console.print("accel serve: drained and stopped", highlight=False)


def _serve_job(
    target: str | None,
    demo: str | None,
    options: dict[str, Any],
    given: dict[str, Any],
    where: _Where,
    *,
    verbose: bool,
) -> tuple[Any, Any]:
    """The job every worker runs and the launch spec; :class:`RunInputError` when it cannot serve."""
    import dataclasses

    from accel.serve.settings import ServeSettings, ServeSettingsError, parse_size
    from accel.serve.worker import ServeJob

    tgt = resolve_target(target, demo)
    if tgt.kind == "script":
        raise RunInputError(f"{target}: accel serve serves a plan or a model, not a script.")
    settings, where = worker_settings(tgt, options, where)
    plan = tgt.plan if settings["strategy"] == "hybrid" else None
    try:
        sizes = tuple(parse_size(text) for text in given["size"] or ())
    except ValueError as exc:
        raise RunInputError(f"--size {exc}") from None
    if plan is not None:
        resolutions = [tuple(r) for r in plan.resolutions]
        outside = [s for s in sizes if s not in resolutions]
        if outside:
            valid = ", ".join(f"{w}x{h}" for h, w in resolutions)
            raise RunInputError(
                f"--size {', '.join(f'{w}x{h}' for h, w in outside)}: the plan {tgt.plan_path} has no bucket for it; "
                f"its sizes are {valid} (or make a plan for that size, or serve with --strategy cfg)."
            )
        sizes = sizes or tuple((int(h), int(w)) for h, w in resolutions)
    try:
        serve_settings = ServeSettings(
            host=given["host"],
            port=given["port"],
            model_name=given["model_name"] or _model_name(tgt),
            sizes=tuple(dict.fromkeys(sizes)),
            batch_sizes=tuple(plan.batches) if plan is not None else None,
            max_batch=given["max_batch"],
            batch_wait_ms=given["batch_wait_ms"],
            queue=given["queue"],
            default_steps=given["steps"],
            max_steps=given["max_steps"],
            default_guidance=given["guidance"],
            drain_timeout_s=given["drain_timeout"],
        )
    except ServeSettingsError as exc:
        raise RunInputError(str(exc)) from None
    if where.node_rank == 0:
        _check_port(serve_settings.host, serve_settings.port)
    spec = dataclasses.replace(
        _launch_spec(where),
        max_restarts=given["max_restarts"],
        stop_timeout_s=serve_settings.drain_timeout_s + 10,
    )
    job = ServeJob(
        source=dict(tgt.source or {}),
        settings=settings,
        serve=serve_settings,
        log_level="INFO" if verbose else "WARNING",
        access_log=verbose,
    )
    return job, spec


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is in use now, before any worker starts."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise RunInputError(
                f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port or --host."
            ) from None
