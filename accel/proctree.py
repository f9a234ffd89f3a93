"""The processes below this one, and ending them: a command that is stopped leaves none behind.

Compilers run pools of worker processes (inductor's compile-worker sidecar and the pool it forks). When a
command is stopped mid-compilation, those can outlive it, orphaned, and keep compiling on every core for
minutes: a launch-bound loop timed next on the same host then runs up to twice as slow.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_PROC = Path("/proc")


def _parents() -> dict[int, int]:
    """Parent pid of every live (not zombie) process, from ``/proc/PID/stat``; empty without ``/proc``."""
    parents: dict[int, int] = {}
    for entry in _PROC.glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile, or not readable
            continue
        # "PID (COMMAND) STATE PPID ...": the command may hold spaces and parentheses.
        state, ppid = stat[stat.rindex(")") + 2 :].split(maxsplit=2)[:2]
        if state != "Z":
            parents[int(entry.name)] = int(ppid)
    return parents


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, their children, ...), nearest first."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found, frontier = [], [root]
    while frontier:
        frontier = [c for p in frontier for c in sorted(children.get(p, ()))]
        found += frontier
    return found


#: Helpers that end by themselves when the process they serve does, and that its last clean-up still
#: talks to: multiprocessing's resource tracker (ending it early makes that clean-up start a new one,
#: which then reports every shared-memory block it never saw) and fork server.
HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _is_helper(pid: int) -> bool:
    try:
        command = (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(helper in command for helper in HELPERS)


def end_descendants(root: int, grace_s: float = 2.0) -> list[int]:
    """SIGTERM every process below ``root`` but multiprocessing's helpers (:data:`HELPERS`; their own
    children are not spared), then SIGKILL those still alive after ``grace_s`` seconds; returns the pids
    signalled. The tree is read once, before any signal: a worker whose parent ends first is handed to
    another parent, where a second look would no longer find it."""
    pids = [pid for pid in descendants(root) if not _is_helper(pid)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if process_alive(pid)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)
    return pids


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie, exited but not yet reaped, has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # already gone, or not ours to end
