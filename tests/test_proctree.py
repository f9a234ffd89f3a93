"""``accel.proctree`` and the command line's stop path: a stopped command leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from accel.proctree import descendants, end_descendants, process_alive

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="reads the process tree in /proc"
)

# A root process whose child starts a grandchild (a compile worker's pool, say); the root prints both pids.
TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]
    GRANDCHILD = "import subprocess, sys, time; p = subprocess.Popen(%r); print(p.pid, flush=True); time.sleep(120)"
    child = subprocess.Popen([sys.executable, "-c", GRANDCHILD % (SLEEP,)], stdout=subprocess.PIPE, text=True)
    print(child.pid, child.stdout.readline().strip(), flush=True)
    time.sleep(120)
    """
)


def test_the_tree_is_found_whole_and_ended_with_a_kill_for_what_ignores_sigterm() -> None:
    root = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        assert root.stdout is not None
        child, grandchild = (int(pid) for pid in root.stdout.readline().split())
        assert descendants(root.pid) == [child, grandchild]  # nearest first
        assert {root.pid, child, grandchild} <= set(descendants(os.getpid()))
        # A stopped process does not act on SIGTERM: after the grace period it gets SIGKILL.
        os.kill(child, signal.SIGSTOP)
        began = time.monotonic()
        assert end_descendants(root.pid, grace_s=0.5) == [child, grandchild]
        deadline = time.monotonic() + 5
        while (process_alive(child) or process_alive(grandchild)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(child) and not process_alive(grandchild)
        assert 0.5 <= time.monotonic() - began < 5  # the kill came after the grace period
        assert process_alive(root.pid) and descendants(root.pid) == []
    finally:
        root.kill()
        root.wait()


def test_multiprocessing_helpers_are_left_to_end_with_their_process() -> None:
    # Ending the resource tracker early makes the process's last clean-up start another, which then
    # prints a traceback per shared-memory block it never saw.
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        from multiprocessing import resource_tracker
        resource_tracker.ensure_running()
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(resource_tracker._resource_tracker._pid, worker.pid, flush=True)
        time.sleep(120)
        """
    )
    root = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert root.stdout is not None
        tracker, worker = (int(pid) for pid in root.stdout.readline().split())
        assert set(descendants(root.pid)) == {tracker, worker}
        assert end_descendants(root.pid, grace_s=1.0) == [worker]
        assert process_alive(tracker) and not process_alive(worker)
    finally:
        root.kill()
        root.wait()


def test_a_stopped_command_ends_the_processes_it_started(tmp_path: Path) -> None:
    # A real `accel plan` run in a process that has started a worker of its own, stopped by SIGTERM.
    driver = textwrap.dedent(
        f"""
        import subprocess, sys
        from accel.cli.app import main
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        sys.argv = ["accel", "plan", "--demo", "sdxl", "--device", "cpu", "--devices", "1", "--repeat", "2000",
                    "-o", {str(tmp_path / "p.json")!r}]
        print(worker.pid, flush=True)
        main(stop_grace_s=1.0)
        """
    )
    command = subprocess.Popen(
        [sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert command.stdout is not None and command.stderr is not None
    worker = int(command.stdout.readline())
    time.sleep(1.5)  # inside the command: its stop handlers are the first thing main() sets
    command.send_signal(signal.SIGTERM)
    _, err = command.communicate(timeout=30)
    assert command.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "accel: interrupted (SIGTERM), stopped.", err
    assert not process_alive(worker)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("swallowed", [1, None])
def test_a_stop_that_a_command_swallows_still_ends_it(swallowed: int | None) -> None:
    """Code that catches every exception swallows the stop's SystemExit: the signal is delivered again at
    once (a command that swallows it once then unwinds cleanly), and a command that swallows every one is
    ended outright after the grace period; both exit with the signal's status and the one-line message,
    and the process they started is ended."""
    driver = textwrap.dedent(
        f"""
        import subprocess, sys, time
        import accel.cli.app as cli
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

        def swallowing() -> None:
            left = {swallowed}  # None: swallows every stop
            print(worker.pid, flush=True)
            while True:
                try:
                    time.sleep(0.05)
                except BaseException:  # a catch-all, as some libraries and finalisers have
                    if left is not None:
                        left -= 1
                        if left < 0:
                            raise

        cli.app = swallowing
        cli.main(stop_grace_s=1.0)
        """
    )
    command = subprocess.Popen(
        [sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert command.stdout is not None
    worker = int(command.stdout.readline())
    began = time.monotonic()
    command.send_signal(signal.SIGTERM)
    try:
        _, err = command.communicate(timeout=30)
    finally:
        command.kill()  # a stop that failed leaves nothing running after the test either
        if process_alive(worker):
            os.kill(worker, signal.SIGKILL)
    took = time.monotonic() - began
    assert command.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "accel: interrupted (SIGTERM), stopped.", err
    assert not process_alive(worker)
    # Delivered again at once; ended outright after the grace period (plus the children's 2 s at most).
    assert (took < 1.0) if swallowed == 1 else (1.0 <= took < 4.0), took
