"""How busy the host's CPUs were with other work while a configuration was timed.

A diffusers eager loop is bound by kernel launches on the CPU, so compile workers of an earlier job or
another process on the same host can slow it twofold with no trace in the GPU's own figures. Each timed
configuration therefore records how many cores other processes kept busy meanwhile, and the report
names the rows measured on a contended host.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType

#: Other processes' average busy cores above which a timed row is reported as contended.
CONTENDED_CORES = 1.0

_STAT = Path("/proc/stat")


def host_busy_s() -> float | None:
    """CPU seconds all processes of this host have spent busy since boot (Linux ``/proc/stat``), or
    ``None`` where the kernel does not say."""
    try:
        first = _STAT.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if first[:1] != ["cpu"] or len(first) < 8:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, *rest = (int(v) for v in first[1:])
    steal = rest[0] if rest else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherCpu:
    """Context manager: the average number of CPU cores other processes kept busy while it was open
    (``cores``; ``None`` where the host does not say). This process's own threads are not counted."""

    def __init__(self) -> None:
        self.cores: float | None = None
        self._start: tuple[float | None, float, float] = (None, 0.0, 0.0)

    def __enter__(self) -> OtherCpu:
        self._start = (host_busy_s(), time.process_time(), time.perf_counter())
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        host0, own0, wall0 = self._start
        host1, own1, wall1 = host_busy_s(), time.process_time(), time.perf_counter()
        if host0 is None or host1 is None or wall1 <= wall0:
            return
        # The host counter ticks at 100 Hz while process time is exact: clamp the rounding below zero.
        self.cores = max(0.0, ((host1 - host0) - (own1 - own0)) / (wall1 - wall0))
