"""The process's C++ runtime is made global before AOTInductor packages are opened."""

from __future__ import annotations

import subprocess
import sys

import pytest

SYMBOL = "_ZNSt6locale7classicEv"  # std::locale::classic(), defined by libstdc++ only


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the loader namespaces are Linux's")
def test_share_libstdcxx_makes_torchs_libstdcxx_global() -> None:
    # A fresh interpreter: torch loads libstdc++ privately; after sharing, libraries opened later (an
    # AOTInductor package's wrapper library) resolve libstdc++ symbols to that one copy.
    code = (
        "import ctypes, torch\n"
        f"before = hasattr(ctypes.CDLL(None), {SYMBOL!r})\n"
        "from accel.compile.cxxruntime import loaded_libstdcxx, share_libstdcxx\n"
        "path = loaded_libstdcxx()\n"
        "assert share_libstdcxx() == path and share_libstdcxx() == path, path\n"
        f"print(before, hasattr(ctypes.CDLL(None), {SYMBOL!r}), 'libstdc++' in path)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "True"]
