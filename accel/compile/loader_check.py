"""The AOTInductor loader check, shared by the processes of one machine (torch is not imported here).

Before a process opens its first CUDA aot package, the package is opened once in a child process (see
:meth:`accel.compile.backends.AOTBackend.check_loader`): a crash there is an error that names the cause,
not a dead rank. The check costs a second interpreter start and torch import (7-8 s on an H200 host), and
a passed one is remembered in accel's cache folder, so it is paid once per machine and torch build. Two
things keep even that once off a run's critical path:

- the processes of one machine take turns through one lock file (:func:`check_lock`): the ranks of an
  8-GPU run wait for one check instead of running eight;
- ``accel run`` and ``accel serve`` start the check in the background (:func:`start_background_check`)
  before they import torch themselves; it holds the lock until it is done, so it overlaps the launcher's
  imports and the weights' loading, and a worker that gets there first waits for its result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from accel.atomic import acquire_flock

logger = logging.getLogger(__name__)

LOCK_NAME = "aot-loader-check.lock"
MARKER_PREFIX = "aot-loader-ok-"
#: Seconds the background check may take: SIGALRM ends it even inside native code, releasing the lock.
BACKGROUND_TIMEOUT_S = 300
#: The background check (``{timeout}``: its alarm): opens the package in that process and leaves the
#: marker when it survives.
BACKGROUND_CHECK = (
    "import signal, sys; signal.alarm({timeout}); "
    "from accel.compile.backends import check_loader_here; check_loader_here(sys.argv[1])"
)
_MANIFEST = "manifest.json"  # accel.compile.store.MANIFEST, which imports torch


def cache_folder() -> Path:
    """accel's cache folder: ``$ACCEL_CACHE_DIR``, else ``$XDG_CACHE_HOME/accel``, else ``~/.cache/accel``."""
    base = os.environ.get("ACCEL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "accel"
    )
    return Path(base)


def _open_lock() -> int | None:
    try:
        folder = cache_folder()
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # an unwritable cache: every process checks for itself
        logger.debug("no loader-check lock in %s: %s", cache_folder(), exc)
        return None


@contextlib.contextmanager
def check_lock(timeout: float) -> Iterator[bool]:
    """Hold the machine's loader-check lock (waiting up to ``timeout`` s); yields whether it is held.

    Not holding it after the timeout (a check that hangs elsewhere, an unwritable cache) only means this
    process runs its own check beside the other one.
    """
    fd = _open_lock()
    if fd is None:
        yield False
        return
    try:
        held = acquire_flock(fd, timeout)
        if not held:
            logger.warning(
                "the aot loader check of another process took over %g s; checking here too", timeout
            )
        yield held
    finally:
        os.close(fd)  # also releases the lock


def cuda_aot_package(engines: str | os.PathLike[str]) -> Path | None:
    """The smallest CUDA aot package recorded in the engine directory ``engines`` (``None``: there is
    none, or the directory cannot be read; the run reports that itself)."""
    folder = Path(engines)
    try:
        records = json.loads((folder / _MANIFEST).read_text())["engines"].values()
        found = [
            (int(r.get("size", 0)), folder / r["file"])
            for r in records
            if r.get("backend") == "aot"
            and r.get("device_type") == "cuda"
            and Path(r["file"]).name == r["file"]
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    found = [(size, path) for size, path in found if path.is_file()]
    return min(found)[1] if found else None


def has_nvidia_gpu() -> bool:
    """Whether this machine shows an NVIDIA driver (its control device), judged without importing torch."""
    return os.path.exists("/dev/nvidiactl")


def probably_checked() -> bool:
    """Whether a passed check is remembered for this interpreter and its torch version, judged without
    importing torch (the markers name both). Only decides whether to start a background check: the
    worker still looks for its exact marker, and checks itself when there is none."""
    try:
        from importlib.metadata import version

        torch_version = version("torch")
        for marker in cache_folder().glob(f"{MARKER_PREFIX}*"):
            identity = json.loads(marker.read_text() or "{}")
            if identity.get("executable") == sys.executable and identity.get("torch") == torch_version:
                return True
    except (OSError, ValueError, AttributeError, ImportError):
        return False
    return False


def start_background_check(engines: str | os.PathLike[str] | None) -> subprocess.Popen[bytes] | None:
    """Start the loader check for the CUDA aot packages of ``engines`` in a background process that holds
    the machine's check lock until it ends; ``None`` when there is nothing to check here (no such
    package, no NVIDIA GPU, a check passed before, or another process is checking now)."""
    if engines is None or not has_nvidia_gpu() or probably_checked():
        return None
    package = cuda_aot_package(engines)
    if package is None:
        return None
    fd = _open_lock()
    if fd is None:
        return None
    try:
        if not acquire_flock(fd, 0.0):
            return None  # another process is checking; a worker waits for that one
        # The child inherits the locked file: the lock is released when the child ends, however it ends.
        return subprocess.Popen(
            [sys.executable, "-c", BACKGROUND_CHECK.format(timeout=BACKGROUND_TIMEOUT_S), str(package)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(fd,),
        )
    except OSError as exc:
        logger.debug("could not start the background loader check: %s", exc)
        return None
    finally:
        os.close(fd)
