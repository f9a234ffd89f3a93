"""How rank 0 hands each batch to the other ranks: through the process group's key-value store.

Rank 0 posts batch ``i`` under its own key; every other rank polls for that key with short checks, so an
idle server issues no collective at all and no collective timeout can expire while it waits for
requests. The pipeline call that follows uses the process group as ``accel run`` does (with its timeout).
After every rank has run batch ``i`` (rank 0 knows: the call's collectives completed), rank 0 deletes its
key.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from accel.errors import AccelError

#: A message that ends the other ranks' loops.
STOP = {"stop": True}


class ChannelClosedError(AccelError, RuntimeError):
    """The other ranks gave up waiting for rank 0 (it stopped without saying so)."""


class BatchChannel:
    """Batches from rank 0 to the other ranks, in order (see the module docstring)."""

    def __init__(self, store: dist.Store, *, poll_s: float = 0.01) -> None:
        self._store = dist.PrefixStore("accel/serve/batch/", store)
        self._processes = dist.PrefixStore("accel/serve/process/", store)
        self._poll_s = poll_s
        self._next = 0

    @classmethod
    def for_default_group(cls) -> BatchChannel:
        """The channel over the default process group's store."""
        return cls(dist.distributed_c10d._get_default_store())

    def announce(self, rank: int) -> None:
        """Record this process (host name and pid) under ``rank``, for :meth:`process`."""
        self._processes.set(str(rank), json.dumps([socket.gethostname(), os.getpid()]))

    def process(self, rank: int) -> tuple[str, int]:
        """The host name and pid ``rank`` announced (waits for it, within the store's timeout)."""
        host, pid = json.loads(self._processes.get(str(rank)))
        return str(host), int(pid)

    def post(self, message: dict[str, Any]) -> int:
        """Send ``message`` (rank 0); returns its sequence number, for :meth:`done`."""
        number = self._next
        self._store.set(str(number), json.dumps(message))
        self._next += 1
        return number

    def done(self, number: int) -> None:
        """Every rank has received message ``number``: drop it from the store (rank 0)."""
        self._store.delete_key(str(number))

    def receive(self, give_up: Callable[[], bool]) -> dict[str, Any]:
        """The next message (ranks other than 0); waits until it comes or ``give_up()`` says to stop."""
        key = str(self._next)
        while not self._store.check([key]):
            if give_up():
                raise ChannelClosedError("rank 0 sent no more batches and did not say stop.")
            time.sleep(self._poll_s)
        self._next += 1
        message: dict[str, Any] = json.loads(self._store.get(key))
        return message
