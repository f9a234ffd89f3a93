"""The process's C++ runtime, shared with the compiled libraries accel loads later.

torch 2.11's AOTInductor links every package's ``*.wrapper.so`` with ``-static-libstdc++``, so the library
carries a private copy of libstdc++ and exports its symbols. torch itself loads the system libstdc++
without ``RTLD_GLOBAL``: when the package library is opened, its locale code binds partly to its own
copy and partly to the process's, and the first ``std::regex`` it builds (in
``torch::aot_inductor::parse_device_str``) crashes with SIGSEGV. Promoting the libstdc++ that torch already
loaded to the global namespace before the first package is opened makes every library in the process use
that one copy (what ``LD_PRELOAD=libstdc++.so.6`` does, without an environment variable).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)


def loaded_libstdcxx() -> str | None:
    """The path of the libstdc++ this process has loaded, or ``None`` (not Linux, or none loaded)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if os.path.basename(path).startswith("libstdc++.so"):
                    return path
    except OSError:
        return None
    return None


def share_libstdcxx() -> str | None:
    """Make the loaded libstdc++ global (``RTLD_GLOBAL | RTLD_NOLOAD``: nothing new is loaded).

    Call it after ``import torch`` and before loading an AOTInductor package. Idempotent; returns the
    path it promoted, or ``None`` where there was nothing to do.
    """
    path = loaded_libstdcxx()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL | getattr(os, "RTLD_NOLOAD", 0))
    except OSError as exc:  # not fatal: the package loader may still work on this build
        logger.debug("could not make %s global: %s", path, exc)
        return None
    return path
