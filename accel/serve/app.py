"""The FastAPI application of rank 0: the endpoints, turning requests into queued work and back.

Endpoints: ``POST /v1/images/generations`` (OpenAI images API), ``GET /v1/models``, ``GET /health``
(503 until warm and while draining, then 200), ``GET /metrics`` (Prometheus) and ``GET /`` (a page to
try the server from a browser). Requests are validated here (:mod:`accel.serve.schema`) before they
are queued; the executor thread answers them through each request's future. This module imports
FastAPI: import it once the ``accel[serve]`` extra is known to be there.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from accel.errors import AccelError
from accel.png import encode_png
from accel.serve.metrics import ServeMetrics
from accel.serve.scheduler import QueueFullError, RequestResult, Scheduler, ShuttingDownError
from accel.serve.schema import ApiError, parse_request
from accel.serve.settings import ServeSettings, format_size

log = logging.getLogger(__name__)

#: How often a waiting handler checks whether its client is still there.
_DISCONNECT_POLL_S = 0.2


class WorkerFailedError(AccelError, RuntimeError):
    """The worker group failed while (or before) running a request; the message names the cause."""


@dataclass
class ServerState:
    """What the endpoints need to know about the server; the executor updates it."""

    settings: ServeSettings
    world_size: int = 1
    ready: bool = False
    draining: bool = False
    running: int = 0
    failure: str | None = None
    started: float = field(default_factory=time.time)

    @property
    def status(self) -> str:
        if self.failure is not None:
            return "failed"
        if self.draining:
            return "draining"
        return "ready" if self.ready else "warming up"


def _error(
    status: int, message: str, *, kind: str = "server_error", headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        ApiError(message, status=status, kind=kind).body(), status_code=status, headers=headers
    )


def encode_image(image: Any, output_format: str = "png", quality: int = 100) -> str:
    """``image`` as a base64 ``output_format`` file (``quality``: of jpeg and webp)."""
    if output_format == "png":
        # accel's own writer: PIL's took 0.16-0.23 s for a 1024² image on a GPU host, ~10 % of a request.
        data = encode_png(image)
    else:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=output_format.upper(), quality=quality)
        data = buffer.getvalue()
    return base64.b64encode(data).decode("ascii")


def page_html() -> str:
    """The page served at ``/`` (plain HTML and JavaScript, no external resources)."""
    return resources.files("accel.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(state: ServerState, scheduler: Scheduler, metrics: ServeMetrics) -> FastAPI:
    """The application serving ``scheduler``'s queue."""
    app = FastAPI(title="accel serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def health() -> Any:
        status = state.status
        body: dict[str, Any] = {"status": status, "queue": scheduler.depth, "running": state.running}
        if state.failure is not None:
            body["error"] = state.failure
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    @app.get("/metrics")
    def prometheus_metrics() -> Any:
        metrics.queue_depth.set(scheduler.depth)
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/models")
    def models() -> Any:
        s = state.settings
        return {
            "object": "list",
            "data": [
                {
                    "id": s.model_name,
                    "object": "model",
                    "created": int(state.started),
                    "owned_by": "accel",
                    # What requests may ask for (the page builds its form from this).
                    "sizes": [format_size(size) for size in s.sizes],
                    "n": list(s.image_counts),
                    "max_steps": s.max_steps,
                    "default_steps": s.default_steps,
                    "default_guidance": s.default_guidance,
                    "ready": state.ready,
                }
            ],
        }

    @app.get("/", response_class=HTMLResponse)
    def page() -> Any:
        return HTMLResponse(page_html())

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Any:
        arrived = time.monotonic()
        response = await _generate(request)
        metrics.requests.labels(status=str(response.status_code)).inc()
        if response.status_code == 200:
            metrics.request_seconds.observe(time.monotonic() - arrived)
        return response

    async def _generate(request: Request) -> Any:
        if state.status != "ready":
            kind = "worker" if state.failure else "shutting_down" if state.draining else "warming_up"
            metrics.errors.labels(kind=kind).inc()
            reason = state.failure or f"the server is {state.status}; retry later."
            return _error(503, reason, headers={"Retry-After": "1"})
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ApiError(f"the request body is not valid JSON: {exc}.") from None
            parsed = parse_request(body, state.settings)
        except ApiError as exc:
            metrics.errors.labels(kind="invalid").inc()
            return JSONResponse(exc.body(), status_code=exc.status)
        first = parsed.seed if parsed.seed is not None else secrets.randbelow(2**31)
        try:
            pending = scheduler.submit(parsed, [first + i for i in range(parsed.n)])
        except QueueFullError as exc:
            metrics.errors.labels(kind="queue_full").inc()
            return _error(
                429, str(exc), kind="rate_limit_error", headers={"Retry-After": str(exc.retry_after_s)}
            )
        except ShuttingDownError as exc:
            metrics.errors.labels(kind="shutting_down").inc()
            return _error(503, str(exc), headers={"Retry-After": "1"})
        metrics.queue_depth.set(scheduler.depth)
        waiting = asyncio.wrap_future(pending.future)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=_DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected() and scheduler.cancel(pending):
                metrics.errors.labels(kind="disconnected").inc()
                log.info("dropped a request whose client disconnected before its batch started")
                return Response(status_code=499)
        try:
            result: RequestResult = waiting.result()
        except asyncio.CancelledError:
            return Response(status_code=499)
        except WorkerFailedError as exc:
            metrics.errors.labels(kind="worker").inc()
            return _error(503, str(exc))
        except ShuttingDownError as exc:
            metrics.errors.labels(kind="shutting_down").inc()
            return _error(503, str(exc))
        started = time.monotonic()
        encoded = await asyncio.to_thread(
            lambda: [
                encode_image(image, parsed.output_format, parsed.output_compression)
                for image in result.images
            ]
        )
        timings = {**result.timings, "encode": time.monotonic() - started}
        metrics.observe_phases(timings)
        return JSONResponse(
            {
                "created": int(time.time()),
                "model": state.settings.model_name,
                "data": [
                    {"b64_json": b64, "seed": seed} for b64, seed in zip(encoded, result.seeds, strict=True)
                ],
                "output_format": parsed.output_format,
                "timings": {phase: round(seconds, 6) for phase, seconds in timings.items()},
                "batch_images": result.batch_images,
            }
        )

    return app
