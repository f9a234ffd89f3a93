"""Process-group communication: preallocated collectives, cross-rank checks, failure propagation.

Everything here is created once per :class:`~accel.Accelerator` and reused by every pipeline call.
Collectives go through ``torch.distributed`` (NCCL on GPUs, gloo on CPUs) and inherit the process
group's timeout, so a collective that cannot complete fails instead of hanging.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_FAILURE_KEY = "error"


class RankMismatchError(RuntimeError):
    """Ranks disagree about something that must be identical on all of them."""


class PeerFailedError(RuntimeError):
    """Another rank failed; this rank stops with that rank's error."""


@dataclass
class CommStats:
    """Counters for the per-call report (updated without any host synchronisation)."""

    collectives: int = 0
    bytes_sent: int = 0

    def reset(self) -> None:
        self.collectives = 0
        self.bytes_sent = 0


@dataclass
class Communicator:
    """Collectives over one process group with buffers allocated once and reused.

    Args:
        rank: this process's rank in ``group``.
        world_size: ranks in ``group``.
        group: the process group (``None``: the default group).
    """

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None
    stats: CommStats = field(default_factory=CommStats)
    _buffers: dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = field(
        default_factory=dict, repr=False
    )

    def gather_buffer(self, local: torch.Tensor) -> torch.Tensor:
        """The reusable output buffer for gathering ``local`` from every rank (rank-major on dim 0)."""
        shape = (local.shape[0] * self.world_size, *local.shape[1:])
        key = (tuple(shape), local.dtype, local.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=local.dtype, device=local.device)
            self._buffers[key] = buf
        return buf

    def all_gather(self, local: torch.Tensor) -> torch.Tensor:
        """Gather ``local`` from every rank into the preallocated buffer and return that buffer.

        The buffer is reused by the next gather of the same shape: consume it (or copy it) before then.
        """
        out = self.gather_buffer(local)
        # torch 2.13 renamed the collective; older releases (2.11 on the GPU host) only have the old name.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, local.contiguous(), group=self.group)
        self.stats.collectives += 1
        self.stats.bytes_sent += local.numel() * local.element_size()
        return out

    def broadcast_int(self, value: int, src: int = 0) -> int:
        """Broadcast one integer from ``src`` (a per-call setup step, never per denoising step)."""
        t = torch.tensor([value], dtype=torch.int64)
        if dist.get_backend(self.group) == dist.Backend.NCCL:
            t = t.cuda()
        dist.broadcast(t, src=src, group=self.group)
        self.stats.collectives += 1
        return int(t.item())

    def check_same(self, what: str, value: str) -> None:
        """Raise :class:`RankMismatchError` on every rank unless all ranks pass the same ``value``."""
        values: list[str | None] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        if len(set(values)) != 1:
            detail = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise RankMismatchError(
                f"ranks disagree about {what} ({detail}). Every rank must run the same script with the "
                "same settings, model and plan."
            )


class FailureMonitor:
    """Ends every rank when one rank fails, with that rank's error.

    A rank that raises posts its error to the process group's key-value store. A watchdog thread on
    every other rank sees it within ``poll_s`` seconds, logs the failed rank's error and exits the
    process (a rank blocked inside a collective cannot be interrupted from Python). The process-group
    timeout remains the backstop for a rank that dies without posting (killed, segfault).
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, *, poll_s: float = 0.25) -> None:
        self._store = dist.PrefixStore("accel/failure/", store)
        self._rank = rank
        self._world_size = world_size
        self._poll_s = poll_s
        self._failed_locally = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="accel-failure-monitor", daemon=True)

    @classmethod
    def for_default_group(cls, rank: int, world_size: int) -> FailureMonitor | None:
        """A monitor on the default group's store, or ``None`` when that store is not reachable."""
        try:
            store = dist.distributed_c10d._get_default_store()
        except (RuntimeError, ValueError):
            log.warning("no key-value store on the default process group: failures propagate by timeout only")
            return None
        return cls(store, rank, world_size)

    def start(self) -> None:
        """Start watching for peer failures."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (on clean shutdown)."""
        self._stop.set()

    def post(self, exc: BaseException) -> None:
        """Publish this rank's failure so that every other rank stops too."""
        if self._failed_locally:
            return
        self._failed_locally = True
        message = f"rank {self._rank} failed with {type(exc).__name__}: {exc}"
        try:
            self._store.set(_FAILURE_KEY, message)
            # The store may live in this process (rank 0 under a spawn launcher): give peers a moment to
            # read the error before this process exits and takes the store down with it.
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                acks = sum(self._store.check([f"ack{r}"]) for r in range(self._world_size) if r != self._rank)
                if acks == self._world_size - 1:
                    break
                time.sleep(0.05)
        except Exception as store_exc:  # the store itself is gone: nothing more to tell anyone
            log.debug("could not publish the failure: %s", store_exc)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                if not self._store.check([_FAILURE_KEY]):
                    continue
                message = self._store.get(_FAILURE_KEY).decode()
                if self._failed_locally:
                    return
                self._store.set(f"ack{self._rank}", "1")
            except Exception:  # store gone (peers exited normally): stop watching, timeouts still apply
                return
            log.error("stopping rank %d because %s", self._rank, message)
            logging.shutdown()
            os._exit(1)
