"""Tuned kernel launch parameters carried inside an ``inductor`` engine file.

A stage compiled with coordinate-descent tuning searches each generated kernel's launch parameters in its
first call and keeps the winners in inductor's autotune cache, one small file per kernel under
``TORCHINDUCTOR_CACHE_DIR``. torch's portable cache artifacts (``save_cache_artifacts``) carry entries
for those files, yet on torch 2.11 a loaded engine's first call into an empty cache searched again
although every kernel found its entry (GPU host, SDXL's VAE decoder: 444 benchmark calls), while a
second load into the cache the first load had filled searched nothing. The engine therefore also carries
the files as the stage's first call left them, and a load writes them back after installing torch's
artifacts.

File layout: :data:`MAGIC`, the header's length (8 bytes, little-endian), a JSON header mapping each
file's key (its path under inductor's cache folder) to its base64 content, then torch's artifact bytes.
A file without :data:`MAGIC` is torch's artifact bytes alone (engines with nothing searched, and engines
exported before this layout).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from accel.atomic import atomic_path
from accel.errors import AccelError

MAGIC = b"accel-inductor-launches-1\n"


class LaunchesError(AccelError, ValueError):
    """An inductor engine file's tuned launch parameters cannot be read: the file is damaged."""


def _cache_root() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def _checked(key: str) -> str:
    """``key`` when it names a file under the cache folder (no absolute path, no ``..``)."""
    parts = PurePosixPath(key).parts
    if not parts or PurePosixPath(key).is_absolute() or ".." in parts:
        raise LaunchesError(f"tuned launch file {key!r} is not a path inside inductor's cache; re-export.")
    return key


def tuned_launches(cache_info: Any, root: Path | None = None) -> dict[str, bytes]:
    """The autotune-cache files a compilation recorded (``cache_info``: what ``save_cache_artifacts``
    returned beside the bytes), read now, after the stage's first call; by key."""
    artifacts = getattr(cache_info, "artifacts", None) or {}
    root = _cache_root() if root is None else root
    found = {}
    for key in artifacts.get("autotune", ()):
        path = root / _checked(key)
        if path.is_file():
            found[key] = path.read_bytes()
    return found


def pack(artifacts: bytes, launches: Mapping[str, bytes]) -> bytes:
    """One engine file: torch's ``artifacts`` and the ``launches`` files (the artifacts alone if none)."""
    if not launches:
        return artifacts
    header = json.dumps(
        {key: base64.b64encode(content).decode("ascii") for key, content in sorted(launches.items())}
    ).encode()
    return MAGIC + len(header).to_bytes(8, "little") + header + artifacts


def unpack(data: bytes) -> tuple[bytes, dict[str, bytes]]:
    """torch's artifact bytes and the launch files of an engine file written by :func:`pack`."""
    if not data.startswith(MAGIC):
        return data, {}
    start = len(MAGIC) + 8
    size = int.from_bytes(data[len(MAGIC) : start], "little")
    if len(data) < start + size:
        raise LaunchesError(
            "the inductor engine file is truncated inside its tuned launch parameters; re-export."
        )
    try:
        header = json.loads(data[start : start + size])
        launches = {_checked(key): base64.b64decode(text, validate=True) for key, text in header.items()}
    except (ValueError, AttributeError, TypeError, binascii.Error) as exc:
        raise LaunchesError(
            f"the inductor engine file's tuned launch parameters are unreadable ({exc}); re-export."
        ) from exc
    return data[start + size :], launches


def restore(launches: Mapping[str, bytes], root: Path | None = None) -> None:
    """Write ``launches`` (as :func:`unpack` returned them, keys checked there) into inductor's cache folder,
    each file replaced whole, never half-written."""
    root = _cache_root() if root is None else root
    for key, content in launches.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(content)
