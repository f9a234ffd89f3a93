"""The bounded FIFO queue of requests and the batcher that turns it into pipeline calls.

HTTP handlers (on the event loop) :meth:`Scheduler.submit` validated requests; the executor (the thread
that drives the pipeline) takes :meth:`Scheduler.next_batch`. The oldest request always goes next; requests
behind it that share its shape (size, steps, guidance, whether a negative prompt is given) join its batch
up to ``max_batch`` images, waiting at most ``batch_wait_ms`` after the oldest one arrived.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from accel.errors import AccelError
from accel.serve.schema import ImageRequest
from accel.serve.settings import ServeSettings


class QueueFullError(AccelError, RuntimeError):
    """The queue is full; ``retry_after_s`` estimates when there will be room."""

    def __init__(self, queue: int, retry_after_s: int) -> None:
        super().__init__(
            f"the server's queue is full ({queue} requests waiting); retry in {retry_after_s} s."
        )
        self.retry_after_s = retry_after_s


class ShuttingDownError(AccelError, RuntimeError):
    """The server is shutting down and takes no more requests."""


@dataclass(eq=False)
class PendingRequest:
    """A queued request and the future its result (:class:`RequestResult`) is delivered through."""

    request: ImageRequest
    seeds: list[int]
    enqueued: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


@dataclass(frozen=True)
class RequestResult:
    """What one request gets back: its images (PIL) in seed order, the seconds of each phase, and how many
    images the pipeline call that made them had."""

    images: list[Any]
    seeds: list[int]
    timings: dict[str, float]
    batch_images: int


@dataclass(frozen=True)
class Batch:
    """Requests that run in one pipeline call; ``number`` counts the server's batches from 0."""

    number: int
    requests: list[PendingRequest]

    @property
    def images(self) -> int:
        return sum(p.request.n for p in self.requests)

    def call(self) -> dict[str, Any]:
        """The batch as plain data (what the other ranks receive): one prompt and seed per image."""
        first = self.requests[0].request
        prompts, negatives, seeds = [], [], []
        for pending in self.requests:
            r = pending.request
            prompts += [r.prompt] * r.n
            negatives += [r.negative_prompt or ""] * r.n
            seeds += pending.seeds
        return {
            "number": self.number,
            "prompts": prompts,
            "negative_prompts": negatives if first.negative_prompt is not None else None,
            "seeds": seeds,
            "steps": first.steps,
            "guidance": first.guidance,
            "height": first.height,
            "width": first.width,
        }


class Scheduler:
    """The bounded queue and the batcher (thread-safe)."""

    def __init__(self, settings: ServeSettings) -> None:
        self._settings = settings
        self._queue: deque[PendingRequest] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._numbers = itertools.count()
        self._batch_seconds = 1.0  # a running estimate of one call, for Retry-After

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch that runs)."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, request: ImageRequest, seeds: list[int]) -> PendingRequest:
        """Queue ``request``; :class:`QueueFullError` or :class:`ShuttingDownError` when it cannot be."""
        with self._cond:
            if self._closed:
                raise ShuttingDownError("the server is shutting down and takes no new requests.")
            if len(self._queue) >= self._settings.queue:
                raise QueueFullError(len(self._queue), self._retry_after())
            pending = PendingRequest(request, seeds)
            self._queue.append(pending)
            self._cond.notify_all()
        return pending

    def _retry_after(self) -> int:
        calls = math.ceil(len(self._queue) / self._settings.max_batch)
        return max(1, math.ceil(calls * self._batch_seconds))

    def cancel(self, pending: PendingRequest) -> bool:
        """Drop ``pending`` if its batch has not started; whether it was dropped."""
        with self._cond:
            try:
                self._queue.remove(pending)
            except ValueError:
                return False
        pending.future.cancel()
        return True

    def record_call(self, seconds: float) -> None:
        """The duration of a finished call (keeps the Retry-After estimate current)."""
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds

    def close(self) -> None:
        """Take no new requests; the queued ones are still served."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def fail_queued(self, exc: BaseException) -> int:
        """Fail every queued request with ``exc``; how many there were."""
        with self._cond:
            failed = list(self._queue)
            self._queue.clear()
        for pending in failed:
            pending.future.set_exception(exc)
        return len(failed)

    def next_batch(self, timeout_s: float) -> Batch | None:
        """The next batch, or ``None`` when nothing arrived within ``timeout_s``."""
        wait_s = self._settings.batch_wait_ms / 1000
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue, timeout_s):
                return None
            # Wait for companions until the oldest request has waited batch_wait_ms, or the batch is full.
            head = self._queue[0]
            while True:
                remaining = head.enqueued + wait_s - time.monotonic()
                if (
                    remaining <= 0
                    or self._closed
                    or self._compatible_images(head) >= self._settings.max_batch
                ):
                    break
                self._cond.wait(remaining)
            chosen = self._choose(head)
            for pending in chosen:
                self._queue.remove(pending)
        return Batch(next(self._numbers), chosen)

    def _compatible_images(self, head: PendingRequest) -> int:
        return sum(p.request.n for p in self._queue if p.request.shape == head.request.shape)

    def _choose(self, head: PendingRequest) -> list[PendingRequest]:
        chosen, images = [], 0
        for pending in self._queue:
            n = pending.request.n
            if pending.request.shape == head.request.shape and images + n <= self._settings.max_batch:
                chosen.append(pending)
                images += n
        # A plan's engines serve only its batch sizes: leave the last requests for the next batch until
        # the count is one of them (the oldest request alone always is: its n was validated).
        allowed = self._settings.image_counts
        while images not in allowed:
            images -= chosen.pop().request.n
        return chosen
