"""A wall-clock budget for one piece of compilation (the tuning of one engine at export).

>>> with time_budget(300.0, "tuning engine 'cfg.full.1024x1024.b2'"):
...     backend.export(module, example_inputs, path)   # BudgetExceeded after 300 s

Inductor has no time limit of its own for coordinate-descent or GEMM autotuning, and the work runs in
this process (the search loop, the benchmarking) and in its compile workers, so the budget is enforced
with ``SIGALRM``: the exception surfaces in the main thread at the next Python bytecode, unwinding the
compilation through its own context managers (a compiler subprocess waited on is killed by
:mod:`subprocess` on the way out). Only the main thread receives signals, so a budget is refused
elsewhere, with the reason.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from accel.errors import AccelError


class BudgetExceeded(AccelError, RuntimeError):
    """The work ran past its budget (raised inside it, in the main thread)."""


@contextlib.contextmanager
def time_budget(seconds: float, what: str) -> Iterator[None]:
    """Run the body for at most ``seconds`` of wall-clock time, else raise :class:`BudgetExceeded`
    naming ``what``. The previous ``SIGALRM`` handler and timer are put back afterwards."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"a time budget must be a positive number of seconds, got {seconds!r}.")
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            f"{what}: a time budget is enforced with SIGALRM, which only the main thread receives; "
            "run it from the main thread or without a budget."
        )
    began = time.monotonic()

    def expired(signum: int, frame: FrameType | None) -> None:
        raise BudgetExceeded(
            f"{what} ran past its budget of {seconds:g} s ({time.monotonic() - began:.1f} s)."
        )

    previous = signal.signal(signal.SIGALRM, expired)
    outer = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer[0] > 0:  # an enclosing timer keeps running, less the time spent here
            signal.setitimer(signal.ITIMER_REAL, max(outer[0] - (time.monotonic() - began), 1e-3), outer[1])
