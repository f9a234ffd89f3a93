"""Rank 0 watches the worker processes of its own host, so that a killed worker fails the running
requests at once, even while rank 0's main thread is blocked in a collective that will only end at the
collective timeout (NCCL does not notice a dead peer by itself)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from accel.proctree import process_alive

log = logging.getLogger(__name__)


class PeerWatch:
    """A daemon thread that calls ``on_exit(rank, pid)`` once, for the first watched process that exits.

    Args:
        pids: rank -> pid of the processes to watch (those on this host).
        on_exit: called from the watching thread.
        poll_s: seconds between checks.
    """

    def __init__(
        self, pids: Mapping[int, int], on_exit: Callable[[int, int], None], *, poll_s: float = 0.25
    ) -> None:
        self._pids = dict(pids)
        self._on_exit = on_exit
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="accel-serve-peer-watch", daemon=True)

    def start(self) -> None:
        if self._pids:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            for rank, pid in self._pids.items():
                if not process_alive(pid):
                    log.error("rank %d (pid %d) exited", rank, pid)
                    self._on_exit(rank, pid)
                    return
