"""A wall-clock budget for one piece of compilation (the tuning of one engine at export).

>>> with time_budget(300.0, "tuning engine 'cfg.full.1024x1024.b2'"):
...     backend.export(module, example_inputs, path)   # BudgetExceeded after 300 s

Inductor has no time limit of its own for coordinate-descent or GEMM autotuning, and the work runs in
this process (the search loop, the benchmarking) and in its compile workers, so the budget is enforced
with ``SIGALRM``: the exception surfaces in the main thread at the next Python bytecode, unwinding the
compilation through its own context managers (a compiler subprocess waited on is killed by
:mod:`subprocess` on the way out). Inductor catches exceptions in places (a failed cache lookup falls
back to compiling), so the exception is raised again every half second until it gets out. Only the main thread receives signals, so a budget is refused
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


#: seconds between repeats of an expired budget's exception (see :func:`time_budget`)
REPEAT_S = 0.5


@contextlib.contextmanager
def time_budget(seconds: float, what: str) -> Iterator[None]:
    """Run the body for at most ``seconds`` of wall-clock time, else raise :class:`BudgetExceeded`
    naming ``what``. The previous ``SIGALRM`` handler and timer are put back afterwards.

    Compilers catch and log exceptions in places (a cache lookup that fails falls back to compiling), so
    an expired budget raises again every :data:`REPEAT_S` seconds until its exception leaves the body;
    compilers also wrap exceptions in their own (:func:`exceeded` finds the budget's inside).
    """
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"a time budget must be a positive number of seconds, got {seconds!r}.")
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            f"{what}: a time budget is enforced with SIGALRM, which only the main thread receives; "
            "run it from the main thread or without a budget."
        )
    began = time.monotonic()
    active = [True]

    def expired(signum: int, frame: FrameType | None) -> None:
        if active[0]:
            raise BudgetExceeded(
                f"{what} ran past its budget of {seconds:g} s ({time.monotonic() - began:.1f} s)."
            )

    previous = signal.signal(signal.SIGALRM, expired)
    outer = signal.setitimer(signal.ITIMER_REAL, seconds, REPEAT_S)
    try:
        yield
    finally:
        try:
            active[0] = False
        finally:  # reached even if the signal lands on the line above
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if outer[0] > 0:  # an enclosing timer keeps running, less the time spent here
                left = max(outer[0] - (time.monotonic() - began), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, left, outer[1])


def exceeded(error: BaseException) -> BudgetExceeded | None:
    """The :class:`BudgetExceeded` behind ``error`` (itself, its causes and contexts, or the
    ``inner_exception`` of a compiler's wrapper such as inductor's ``InductorError``), else ``None``."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BudgetExceeded):
            return current
        inner = getattr(current, "inner_exception", None)
        pending += [
            current.__cause__,
            current.__context__,
            inner if isinstance(inner, BaseException) else None,
        ]
    return None
