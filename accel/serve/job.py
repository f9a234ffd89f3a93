"""What ``accel serve`` was asked to serve, checked before any process starts: the job every worker runs
and the launch spec. Every problem is a :class:`~accel.request.RequestError` naming the fix."""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accel.jobs import Layout, worker_settings
from accel.launch import LaunchSpec
from accel.request import GenerationRequest, RequestError
from accel.serve.settings import ServeSettings, format_size, parse_size
from accel.source import ModelSource
from accel.targets import resolve_target

#: Seconds the launcher waits for the workers after the drain deadline before it kills them.
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class ServeJob:
    """Everything a serving worker needs (picklable: it travels to spawned processes).

    ``source`` names the model, ``settings`` are the keyword arguments of :class:`accel.AccelSettings`,
    ``serve`` the server's settings.
    """

    source: ModelSource
    settings: dict[str, Any]
    serve: ServeSettings
    log_level: str = "WARNING"
    access_log: bool = False


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening; :class:`RequestError` when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RequestError(
            f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port or --host."
        ) from None
    sock.listen(2048)
    return sock


def serve_job(
    target: str | None,
    demo: str | None,
    request: GenerationRequest,
    layout: Layout,
    server: dict[str, Any],
    *,
    sizes: list[str],
    max_restarts: int = 0,
    verbose: bool = False,
) -> tuple[ServeJob, LaunchSpec]:
    """The job and launch spec for serving ``target`` (or ``demo``).

    ``request`` carries the acceleration settings (as ``accel run`` takes them), ``server`` the keyword
    arguments of :class:`ServeSettings` (``model_name`` ``None``: the model's name), ``sizes`` the
    ``--size`` values as given.
    """
    tgt = resolve_target(target, demo)
    if tgt.source is None:
        raise RequestError(f"{target}: accel serve serves a plan or a model, not a script.")
    settings, layout = worker_settings(tgt, request, layout)
    plan = tgt.plan if settings["strategy"] == "hybrid" else None
    try:
        served = tuple(dict.fromkeys(parse_size(text) for text in sizes))
    except ValueError as exc:
        raise RequestError(f"--size {exc}") from None
    if plan is not None:
        buckets = [(int(h), int(w)) for h, w in plan.resolutions]
        outside = [s for s in served if s not in buckets]
        if outside:
            raise RequestError(
                f"--size {', '.join(map(format_size, outside))}: the plan {tgt.plan_path} has no bucket for it "
                f"(its sizes: {', '.join(map(format_size, buckets))}); make a plan for that size, or serve with "
                "--strategy cfg."
            )
        served = served or tuple(buckets)
    source = tgt.source
    name = Path(source.location).name if source.kind == "folder" else source.location
    serve_settings = ServeSettings(
        **{**server, "model_name": server.get("model_name") or name},
        sizes=served,
        batch_sizes=tuple(plan.batches) if plan is not None else None,
    )
    if layout.node_rank == 0:
        listening_socket(serve_settings.host, serve_settings.port).close()
    spec = dataclasses.replace(
        layout.launch_spec(),
        max_restarts=max_restarts,
        stop_timeout_s=serve_settings.drain_timeout_s + STOP_GRACE_S,
    )
    job = ServeJob(
        source=source,
        settings=settings,
        serve=serve_settings,
        log_level="INFO" if verbose else "WARNING",
        access_log=verbose,
    )
    return job, spec
