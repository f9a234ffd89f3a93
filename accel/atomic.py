"""Atomic file writes (readers see the old file or the whole new one, never half of it) and file locks."""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a fresh temporary path beside ``path``; on success it is synced and renamed onto ``path``.

    The temporary name ends in ``suffix`` (some exporters insist on their own extension) and does not
    exist yet when yielded, so a tool may create it as it likes.

    On an exception the temporary file is removed and ``path`` is left as it was. The new file gets the
    permissions a plain ``open()`` would give it (``mkstemp`` alone would leave it private).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    os.unlink(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def unwritable_reason(path: str | os.PathLike[str]) -> str | None:
    """Why a file or folder cannot be created at ``path`` (``None``: it can), without leaving anything.

    The nearest existing folder above ``path`` (or ``path`` itself, an existing folder) must take a new
    file: tried for real, since permission bits do not tell (root, read-only mounts).
    """
    target = Path(path)
    existing = target if target.is_dir() else target.parent
    while not existing.exists():
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"cannot write under {existing} ({exc.strerror or type(exc).__name__})"
    return None


def acquire_flock(fd: int, timeout: float, *, poll: float = 0.05) -> bool:
    """Take an exclusive ``flock`` on ``fd``, waiting up to ``timeout`` seconds; whether it was taken.

    Polled (``LOCK_NB``) rather than blocking, so a holder that never lets go costs a timeout, not a hang.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
