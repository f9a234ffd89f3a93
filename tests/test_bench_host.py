"""``accel.bench.host``: other processes' CPU use while a configuration is timed, read from the kernel."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from accel.bench.host import OtherCpu, host_busy_s

pytestmark = pytest.mark.skipif(host_busy_s() is None, reason="the host's CPU counters need Linux /proc/stat")


def test_a_busy_process_beside_the_timed_one_is_counted() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the interpreter is up and spinning
        with OtherCpu() as other:
            time.sleep(1.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert other.cores is not None and 0.7 <= other.cores <= 1.3


def test_the_timed_process_own_work_is_not_counted() -> None:
    with OtherCpu() as other:
        end = time.perf_counter() + 1.5
        while time.perf_counter() < end:
            pass
    assert other.cores is not None and other.cores < 0.5
