"""What every rank of ``accel serve`` runs, from joining the group to leaving it.

Every rank loads and wraps the pipeline, then runs the calls rank 0 hands it through the
:class:`~accel.serve.channel.BatchChannel` (warm-up calls first, then batches of requests) until rank 0
says stop. Rank 0 also runs the HTTP server (uvicorn, in a thread) and the executor loop that takes
batches from the :class:`~accel.serve.scheduler.Scheduler`; it drives the pipeline from the main thread.

SIGTERM (or SIGINT) on rank 0 drains: no new requests, the queued and running ones finish within
``drain_timeout_s``, then every rank stops and the process exits 0. The other ranks keep following rank
0 after their own SIGTERM (the launcher forwards it to every worker) until rank 0 says stop. A call that
fails (a peer died, a collective timed out) fails its requests and every queued one with 503 and the
cause, and rank 0 raises, so the launcher ends the group with that error.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from accel.serve.channel import STOP, BatchChannel
from accel.serve.job import ServeJob, listening_socket
from accel.serve.settings import ServeSettings, ServeSettingsError, format_size
from accel.serve.watch import PeerWatch

log = logging.getLogger(__name__)

#: How long the executor waits for a batch before it checks for a shutdown.
_IDLE_POLL_S = 0.1
#: How long rank 0 lets the HTTP thread answer after a peer's reported failure, before it stops.
_ANSWER_GRACE_S = 1.0
#: How long the other ranks keep waiting for rank 0 after their own SIGTERM, beyond the drain deadline.
_FOLLOW_GRACE_S = 5.0


@dataclass
class _Shutdown:
    """Set by SIGTERM/SIGINT: when it came (monotonic seconds), and what to do then."""

    since: float | None = None
    callbacks: list[Any] = field(default_factory=list)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.info("received %s: draining", signal.Signals(signum).name)
            for callback in self.callbacks:
                callback()


def serve_worker(job: ServeJob) -> dict[str, Any]:
    """The launched function of ``accel serve``: serve until SIGTERM; returns rank 0's counts."""
    from accel.generation import run_in_group

    # The server's own records (warm, draining, stopped) are shown whatever the other loggers' level.
    logging.getLogger(__name__).setLevel(min(logging.INFO, logging.getLevelName(job.log_level)))
    shutdown = _Shutdown()
    shutdown.install()
    result = run_in_group(job.settings, job.log_level, lambda acc: _serve(acc, job, shutdown))
    if shutdown.since is not None:
        # The launcher forwarded SIGTERM and now waits for this process to exit; a worker that returns
        # instead waits for the launcher to collect its result, which it does not do while shutting down.
        log.info("drained: exiting")
        logging.shutdown()
        os._exit(0)
    return result


def _serve(acc: Any, job: ServeJob, shutdown: _Shutdown) -> dict[str, Any]:
    channel = BatchChannel.for_default_group() if acc.world_size > 1 else None
    if channel is not None:
        channel.announce(acc.rank)
    if acc.rank != 0:
        assert channel is not None
        return _follow(acc, job, channel, shutdown)
    return _lead(acc, job, channel, shutdown)


def _load(acc: Any, job: ServeJob) -> tuple[Any, Any]:
    from accel.generation import load_wrapped

    return load_wrapped(acc, job.source)


class _Call:
    """Runs one call message on the wrapped pipeline; records when its denoising loop ended."""

    def __init__(self, pipe: Any, wrapped: Any) -> None:
        self._wrapped = wrapped
        self._takes_callback = "callback_on_step_end" in inspect.signature(type(pipe).__call__).parameters
        self.loop_end = 0.0

    def __call__(self, message: dict[str, Any]) -> list[Any]:
        from accel.images import call_arguments

        call = call_arguments(
            message["prompts"],
            message["seeds"],
            steps=message["steps"],
            guidance=message["guidance"],
            negative_prompts=message["negative_prompts"],
            height=message["height"],
            width=message["width"],
        )
        steps = message["steps"]
        self.loop_end = 0.0
        if self._takes_callback:

            def on_step_end(_pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                if step + 1 == steps:
                    self.loop_end = time.monotonic()
                return kwargs

            call["callback_on_step_end"] = on_step_end
        images: list[Any] = self._wrapped(**call).images
        return images


def _follow(acc: Any, job: ServeJob, channel: BatchChannel, shutdown: _Shutdown) -> dict[str, Any]:
    """Ranks other than 0: run every call rank 0 posts until it says stop."""
    pipe, wrapped = _load(acc, job)
    run = _Call(pipe, wrapped)
    deadline_s = job.serve.drain_timeout_s + _FOLLOW_GRACE_S

    def give_up() -> bool:
        return shutdown.since is not None and time.monotonic() - shutdown.since > deadline_s

    calls = 0
    while True:
        message = channel.receive(give_up)
        if message.get("stop"):
            break
        run(message)
        calls += 1
    return {"rank": acc.rank, "calls": calls}


def _model_sizes(pipe: Any, declared: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The sizes to serve: those declared, checked against what the model can generate; else its default."""
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    patch = int(getattr(getattr(denoiser, "config", None), "patch_size", None) or 1)
    multiple = scale * patch
    if not declared:
        default = int(getattr(pipe, "default_sample_size", 128 // scale)) * scale
        return ((default, default),)
    wrong = [size for size in declared if size[0] % multiple or size[1] % multiple]
    if wrong:
        raise ServeSettingsError(
            f"--size {', '.join(format_size(s) for s in wrong)}: this model generates sizes whose width and "
            f"height are multiples of {multiple}."
        )
    return declared


def _warm_counts(settings: ServeSettings) -> list[int]:
    """The batch sizes to warm up: every one a plan allows, else a single image and a full batch."""
    counts = settings.image_counts
    if settings.batch_sizes is not None:
        return list(counts)
    return sorted({counts[0], counts[-1]})


def _settle(
    future: concurrent.futures.Future[Any], *, result: Any = None, error: BaseException | None = None
) -> None:
    """Deliver to a request's future unless its client went away (its future is cancelled)."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled in between


class _Executor:
    """Rank 0's side of the pipeline: posts each call to the other ranks, runs it, answers its requests."""

    def __init__(
        self, acc: Any, job: ServeJob, channel: BatchChannel | None, state: Any, metrics: Any
    ) -> None:
        pipe, wrapped = _load(acc, job)
        self._run = _Call(pipe, wrapped)
        self._channel = channel
        self._state = state
        self._metrics = metrics
        self._running: Any = None
        self.batches = self.images = 0
        # The sizes are known now that the model is: the endpoints validate against these.
        state.settings = state.settings.with_sizes(_model_sizes(pipe, state.settings.sizes))

    def call(self, message: dict[str, Any]) -> list[Any]:
        """Run one call on every rank; its images."""
        number = self._channel.post(message) if self._channel is not None else None
        images = self._run(message)
        if self._channel is not None and number is not None:
            self._channel.done(number)  # every rank took part in the call: all of them have read it
        return images

    def warm_up(self) -> None:
        """One call per served size and batch size, so that no request pays for a first call."""
        settings = self._state.settings
        for height, width in settings.sizes:
            for count in _warm_counts(settings):
                self.call(_warmup_message(settings, height, width, count))

    def run_batch(self, batch: Any) -> None:
        """Run ``batch`` and answer its requests; on failure, fail them (and the queued ones) and raise."""
        from accel.serve.app import WorkerFailedError
        from accel.serve.scheduler import RequestResult

        begun = time.monotonic()
        self._state.running = batch.images
        self._running = batch
        try:
            images = self.call(batch.call())
        except Exception as exc:
            # The peer watch may have named the cause already (a worker process that exited).
            failure = WorkerFailedError(
                self._state.failure
                or f"the worker group failed while generating ({type(exc).__name__}: {exc}); the server stops."
            )
            self.fail_running(failure)
            raise failure from exc
        ended = time.monotonic()
        self._running = None
        self._state.running = 0
        loop_end = self._run.loop_end or ended
        self._metrics.images.inc(batch.images)
        self._metrics.batch_images.observe(batch.images)
        self.batches += 1
        self.images += batch.images
        offset = 0
        for pending in batch.requests:
            n = pending.request.n
            timings = {
                "queue": begun - pending.enqueued,
                "loop": loop_end - begun,
                "decode": ended - loop_end,
            }
            result = RequestResult(images[offset : offset + n], pending.seeds, timings, batch.images)
            _settle(pending.future, result=result)
            offset += n

    def fail_running(self, failure: BaseException) -> None:
        """Fail the requests of the running call (from any thread)."""
        self._state.failure = self._state.failure or str(failure)
        batch = self._running
        for pending in batch.requests if batch is not None else ():
            _settle(pending.future, error=failure)

    def stop_others(self) -> None:
        """Tell the other ranks to leave their loops."""
        if self._channel is not None:
            self._channel.post(STOP)


def _lead(acc: Any, job: ServeJob, channel: BatchChannel | None, shutdown: _Shutdown) -> dict[str, Any]:
    """Rank 0: the HTTP server (a thread), then the warm-up, then batches until a drain ends."""
    import uvicorn

    from accel.serve.app import ServerState, WorkerFailedError, create_app
    from accel.serve.metrics import ServeMetrics
    from accel.serve.scheduler import Scheduler, ShuttingDownError

    settings = job.serve
    sock = listening_socket(settings.host, settings.port)
    state = ServerState(settings=settings, world_size=acc.world_size)
    scheduler = Scheduler(settings)
    metrics = ServeMetrics()
    config = uvicorn.Config(
        create_app(state, scheduler, metrics),
        log_level="info" if job.access_log else "warning",
        access_log=job.access_log,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
    )
    server = uvicorn.Server(config)
    http = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="accel-serve-http", daemon=True
    )
    http.start()

    def start_draining() -> None:
        state.draining = True
        scheduler.close()

    shutdown.callbacks.append(start_draining)
    try:
        started = time.monotonic()
        executor = _Executor(acc, job, channel, state, metrics)

        def fail_all(failure: BaseException) -> None:
            scheduler.close()
            executor.fail_running(failure)
            scheduler.fail_queued(failure)

        def worker_exited(rank: int, pid: int) -> None:
            fail_all(
                WorkerFailedError(
                    f"the worker group failed: rank {rank} (pid {pid}) exited; the server stops."
                )
            )

        def peer_failed(message: str) -> None:
            fail_all(WorkerFailedError(f"the worker group failed: {message}; the server stops."))
            time.sleep(_ANSWER_GRACE_S)  # the HTTP thread sends the 503s before this process exits

        watch = PeerWatch(_local_peers(channel, acc.world_size), worker_exited)
        watch.start()
        acc.on_peer_failure(peer_failed)
        executor.warm_up()
        log.info(
            "warm after %.1f s: serving %s on http://%s:%d (sizes %s, %d process(es))",
            time.monotonic() - started,
            settings.model_name,
            settings.host,
            settings.port,
            ", ".join(format_size(s) for s in state.settings.sizes),
            acc.world_size,
        )
        state.ready = True
        metrics.ready.set(1)
        while shutdown.since is None or (
            scheduler.depth and time.monotonic() - shutdown.since <= settings.drain_timeout_s
        ):
            batch = scheduler.next_batch(_IDLE_POLL_S)
            if batch is not None:
                metrics.queue_depth.set(scheduler.depth)
                started = time.monotonic()
                executor.run_batch(batch)
                scheduler.record_call(time.monotonic() - started)
        left = scheduler.fail_queued(ShuttingDownError("the server shut down before this request started."))
        if left:
            log.warning("drain deadline passed: %d queued request(s) answered 503", left)
        watch.stop()  # the other ranks exit now
        executor.stop_others()
    except BaseException as exc:
        if state.failure is None:
            state.failure = f"the server failed: {type(exc).__name__}: {exc}"
        scheduler.close()
        scheduler.fail_queued(WorkerFailedError(state.failure))
        raise
    finally:
        scheduler.close()
        # Answers already delivered are sent before the HTTP server stops (uvicorn's graceful shutdown).
        server.should_exit = True
        http.join(settings.drain_timeout_s + 5)
        sock.close()
    log.info("stopped after %d batch(es), %d image(s)", executor.batches, executor.images)
    return {"rank": acc.rank, "batches": executor.batches, "images": executor.images}


def _local_peers(channel: BatchChannel | None, world_size: int) -> dict[int, int]:
    """rank -> pid of the other ranks on this host."""
    host = socket.gethostname()
    peers = {}
    for rank in range(1, world_size if channel is not None else 1):
        assert channel is not None
        peer_host, pid = channel.process(rank)
        if peer_host == host:
            peers[rank] = pid
    return peers


def _warmup_message(settings: ServeSettings, height: int, width: int, count: int) -> dict[str, Any]:
    return {
        "prompts": ["warm-up"] * count,
        "negative_prompts": None,
        "seeds": list(range(count)),
        "steps": settings.default_steps,
        "guidance": settings.default_guidance,
        "height": height,
        "width": width,
    }


def launch_server(job: ServeJob, spec: Any) -> None:
    """Start the worker group (:class:`accel.launch.LaunchSpec` ``spec``) and serve until SIGTERM;
    returns once every worker has drained and exited. Raises :class:`accel.launch.LaunchError` when a
    worker fails. SIGINT stops the command as any other (exit 130)."""
    from accel.launch import LaunchError, launch_function

    drained: list[int] = []

    def on_sigterm(signum: int, _frame: Any) -> None:
        # The launcher passed SIGTERM on to the workers, waited for them to drain, and delivers it here
        # again: for a server that is the way to stop, not a failure.
        drained.append(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        launch_function(spec, serve_worker, job)
    except LaunchError:
        if not drained:
            raise
        log.info("stopped by SIGTERM: the workers drained and stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
