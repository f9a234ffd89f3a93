"""Process-group communication: preallocated collectives, cross-rank checks, failure propagation.

Everything here is created once per :class:`~accel.Accelerator` and reused by every pipeline call.
Collectives go through ``torch.distributed`` (NCCL on GPUs, gloo on CPUs) and inherit the process
group's timeout, so a collective that cannot complete fails instead of hanging. The sub-groups of the
CFG group layout (:mod:`accel.runtime.groups`) are created with the same timeout.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from accel.errors import AccelError
from accel.runtime.groups import GroupLayout

log = logging.getLogger(__name__)

_FAILURE_KEY = "error"


class RankMismatchError(AccelError, RuntimeError):
    """Ranks disagree about something that must be identical on all of them."""


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

    The communicator of the whole world also holds the sub-communicators of the CFG group layout
    (:meth:`create_groups`, :meth:`block`, :meth:`stride`, :attr:`cfg_group`); they share its ``stats``.

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
    _subgroups: dict[tuple[str, int], Communicator] = field(default_factory=dict, repr=False)

    @property
    def layout(self) -> GroupLayout:
        """The CFG group layout of this communicator's ranks (meaningful for the world communicator; a
        sub-communicator of an odd number of ranks raises :class:`~accel.runtime.groups.LayoutError`)."""
        return GroupLayout(self.world_size)

    def create_groups(self, timeout_s: float) -> None:
        """Create the process groups of every block and stride of the layout (once, on every rank).

        ``torch.distributed.new_group`` is collective over the whole world: every rank creates every group,
        in the same order, including the groups it is not a member of.
        """
        if self._subgroups:
            return
        layout = self.layout
        timeout = datetime.timedelta(seconds=timeout_s)
        for size in layout.block_sizes:
            for kind, members_of in (("block", layout.blocks(size)), ("stride", layout.strides(size))):
                for members in members_of:
                    group = dist.new_group(list(members), timeout=timeout)
                    if self.rank in members:
                        self._subgroups[(kind, size)] = Communicator(
                            rank=members.index(self.rank),
                            world_size=len(members),
                            group=group,
                            stats=self.stats,
                        )
        log.debug("rank %d: %s", self.rank, layout.describe())

    def block(self, size: int) -> Communicator:
        """The communicator of this rank's block of ``size`` consecutive ranks (``size == world_size``: this
        communicator)."""
        if size == self.world_size:
            return self
        return self._subgroup("block", size)

    def stride(self, size: int) -> Communicator:
        """The communicator of the ranks at this rank's position in every block of ``size`` (``size == 1``:
        this communicator)."""
        if size == 1:
            return self
        return self._subgroup("stride", size)

    @property
    def cfg_group(self) -> Communicator | None:
        """The communicator of this rank's CFG group (``None`` while each group is a single rank)."""
        k = self.layout.group_size
        return self.block(k) if k > 1 else None

    def _subgroup(self, kind: str, size: int) -> Communicator:
        self.layout.blocks(size)  # a size that does not divide the world: LayoutError naming it
        sub = self._subgroups.get((kind, size))
        if sub is None:
            raise RuntimeError(
                f"no process group for {kind}s of {size} ranks: this communicator's sub-groups were not "
                "created. Create it through accel.Accelerator, or call create_groups() on every rank."
            )
        return sub

    def gather_buffer(self, local: torch.Tensor) -> torch.Tensor:
        """The reusable output buffer for gathering ``local`` from every rank (rank-major on dim 0)."""
        shape = (local.shape[0] * self.world_size, *local.shape[1:])
        key = (tuple(shape), local.dtype, local.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=local.dtype, device=local.device)
            self._buffers[key] = buf
        return buf

    def all_gather(self, local: torch.Tensor, *, reuse: bool = True) -> torch.Tensor:
        """Gather ``local`` from every rank (rank-major on dim 0) into the preallocated buffer and return it.

        The buffer is reused by the next gather of the same shape: consume it (or copy it) before then.
        ``reuse=False`` gathers into a new tensor instead, for results that views may keep alive.
        """
        if reuse:
            out = self.gather_buffer(local)
        else:
            out = local.new_empty((local.shape[0] * self.world_size, *local.shape[1:]))
        # torch 2.13 renamed the collective; older releases (2.11 on the GPU host) only have the old name.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, local.contiguous(), group=self.group)
        self.stats.collectives += 1
        self.stats.bytes_sent += local.numel() * local.element_size()
        return out

    def all_to_all(self, chunks: torch.Tensor) -> torch.Tensor:
        """Send ``chunks[i]`` to rank ``i`` and return a new tensor whose ``[i]`` came from rank ``i``.

        ``chunks`` has ``world_size`` rows on dim 0 (one per peer). A new output tensor is returned each
        time, since callers keep views of it.
        """
        if chunks.shape[0] != self.world_size:
            raise ValueError(
                f"all_to_all needs one chunk per rank on dim 0 ({self.world_size}), got {tuple(chunks.shape)}."
            )
        send = chunks.contiguous()
        out = torch.empty_like(send)
        dist.all_to_all_single(out, send, group=self.group)
        self.stats.collectives += 1
        # What leaves this rank: every chunk but its own.
        self.stats.bytes_sent += send[0].numel() * send.element_size() * (self.world_size - 1)
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


#: The ``extraInfo`` key of an elastic error file that names the peer whose failure stopped this rank.
PEER_FAILURE = "accel_peer_failure"


def _record_peer_failure(failure: dict[str, object], message: str) -> None:
    """Write the elastic launcher's error file of this rank: stopped because of ``failure`` (rank, error)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {
        "message": {
            "message": f"stopped because {message}",
            "extraInfo": {"py_callstack": "", "timestamp": str(int(time.time())), PEER_FAILURE: failure},
        }
    }
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    except OSError as exc:  # the launcher then reports this rank's exit code; the log above has the cause
        log.debug("could not record the peer failure in %s: %s", path, exc)


class FailureMonitor:
    """Ends every rank when one rank fails, with that rank's error.

    A rank that raises posts its error to the process group's key-value store. A watchdog thread on
    every other rank sees it within ``poll_s`` seconds, logs the failed rank's error and exits the
    process (a rank blocked inside a collective cannot be interrupted from Python). The process-group
    timeout remains the backstop for a rank that dies without posting (killed, segfault).

    Under an elastic launcher (``accel run``, torchrun) a rank stopped this way records the failed
    rank's error in its own error file (:data:`PEER_FAILURE` in ``extraInfo``): the launcher may see the
    stopped rank end before the failed one, and still reports the failed rank's error.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, *, poll_s: float = 0.25) -> None:
        self._store = dist.PrefixStore("accel/failure/", store)
        self._rank = rank
        self._world_size = world_size
        self._poll_s = poll_s
        self._failed_locally = False
        self._before_exit: list[Callable[[str], None]] = []
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
        """Start watching for peer failures (until :meth:`stop`, or until the interpreter exits)."""
        self._thread.start()
        # A watcher still inside a store call while the interpreter tears the store down can abort the
        # process (SIGABRT) instead of letting it exit with its own error.
        atexit.register(self.stop)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop watching and wait for the watcher to finish its current poll."""
        self._stop.set()
        atexit.unregister(self.stop)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def before_exit(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(message)`` when a peer's failure stops this rank, just before the process exits
        (a server answers its clients with the cause). It runs on the watcher thread."""
        self._before_exit.append(callback)

    def post(self, exc: BaseException) -> None:
        """Publish this rank's failure so that every other rank stops too."""
        if self._failed_locally:
            return
        self._failed_locally = True
        failure = {"rank": self._rank, "error": f"{type(exc).__name__}: {exc}"}
        try:
            self._store.set(_FAILURE_KEY, json.dumps(failure))
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
                failure = json.loads(self._store.get(_FAILURE_KEY).decode())
                if self._failed_locally:
                    return
                self._store.set(f"ack{self._rank}", "1")
            except Exception:  # store gone (peers exited normally): stop watching, timeouts still apply
                return
            message = f"rank {failure['rank']} failed with {failure['error']}"
            log.error("stopping rank %d because %s", self._rank, message)
            for callback in self._before_exit:
                try:
                    callback(message)
                except Exception:
                    log.exception("a callback before stopping rank %d failed", self._rank)
            _record_peer_failure(failure, message)
            logging.shutdown()
            os._exit(1)
