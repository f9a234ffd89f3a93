"""The AOTInductor loader check shared by the processes of one machine: one check, run in the background
by `accel run`/`accel serve` before their own imports, waited for by every worker (real processes and
real file locks; the package load itself is replaced, as CPU machines have no CUDA package to open)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from accel.atomic import acquire_flock
from accel.compile import loader_check
from accel.compile.backends import AOTBackend, loader_check_marker


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("ACCEL_CACHE_DIR", str(folder))
    return folder


def _lock_is_free(cache: Path) -> bool:
    fd = os.open(cache / loader_check.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        return acquire_flock(fd, 0.0)
    finally:
        os.close(fd)


def _engine_dir(tmp_path: Path, records: dict[str, dict[str, Any]]) -> Path:
    folder = tmp_path / "engines"
    folder.mkdir()
    for record in records.values():
        (folder / record["file"]).write_bytes(b"x" * record["size"])
    (folder / "manifest.json").write_text(json.dumps({"version": 1, "engines": records}))
    return folder


def test_a_worker_waits_for_the_check_another_process_is_running(cache: Path, tmp_path: Path) -> None:
    """A process holding the machine's check lock (a rank checking, or the background check) is waited
    for, and its passed check is used: the waiting process opens no child of its own."""
    marker = loader_check_marker(AOTBackend.LOADER_CHECK)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import os, sys, time
                from accel.compile import loader_check
                with loader_check.check_lock(5.0) as held:
                    print("held" if held else "not held", flush=True)
                    time.sleep(1.5)
                    open({str(marker)!r}, "w").write("{{}}")
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        backend = AOTBackend()

        def no_child(*args: Any) -> str | None:
            raise AssertionError("the other process's passed check is used")

        backend._load_in_child = no_child  # type: ignore[method-assign]
        started = time.perf_counter()
        backend.check_loader(tmp_path / "stage.pt2", 0)
        assert time.perf_counter() - started > 0.5  # it waited for the holder
        assert marker.exists()
    finally:
        holder.wait(timeout=30)
    assert holder.returncode == 0


def test_the_check_runs_in_one_process_while_others_wait(cache: Path, tmp_path: Path) -> None:
    """Without a check in flight a process takes the lock and checks itself; the check is kept."""

    class Passing(AOTBackend):
        LOADER_CHECK = "import time; time.sleep(0.2)"

    Passing().check_loader(tmp_path / "stage.pt2", 0)
    assert loader_check_marker(Passing.LOADER_CHECK).exists()
    assert _lock_is_free(cache)


def test_the_background_check_holds_the_lock_until_it_ends(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`accel run` starts the check for the directory's smallest CUDA aot package; the lock is held from
    before the call returns to the check's end; a second start while it runs starts nothing."""
    engines = _engine_dir(
        tmp_path,
        {
            "cfg": {"file": "cfg.aot.pt2", "backend": "aot", "device_type": "cuda", "size": 40},
            "vae": {"file": "vae.aot.pt2", "backend": "aot", "device_type": "cuda", "size": 10},
            "cpu": {"file": "cpu.aot.pt2", "backend": "aot", "device_type": "cpu", "size": 1},
            "ind": {"file": "ind.inductor.bin", "backend": "inductor", "device_type": "cuda", "size": 2},
        },
    )
    seen = tmp_path / "seen.txt"
    monkeypatch.setattr(loader_check, "has_nvidia_gpu", lambda: True)
    monkeypatch.setattr(
        loader_check,
        "BACKGROUND_CHECK",
        f"import sys, time; time.sleep(1.0); open({str(seen)!r}, 'w').write(sys.argv[1])",
    )
    proc = loader_check.start_background_check(engines)
    assert proc is not None
    try:
        assert not _lock_is_free(cache)
        assert loader_check.start_background_check(engines) is None  # one check at a time
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert seen.read_text() == str(engines / "vae.aot.pt2")
    assert _lock_is_free(cache)


def test_a_background_check_that_hangs_is_ended_by_its_alarm(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However the check hangs (in native code too), SIGALRM ends it and the lock is released."""
    import signal

    engines = _engine_dir(
        tmp_path, {"cfg": {"file": "cfg.aot.pt2", "backend": "aot", "device_type": "cuda", "size": 4}}
    )
    monkeypatch.setattr(loader_check, "has_nvidia_gpu", lambda: True)
    assert loader_check.BACKGROUND_CHECK.startswith("import signal, sys; signal.alarm({timeout}); ")
    monkeypatch.setattr(loader_check, "BACKGROUND_TIMEOUT_S", 1)
    monkeypatch.setattr(
        loader_check, "BACKGROUND_CHECK", "import signal, time; signal.alarm({timeout}); time.sleep(60)"
    )
    proc = loader_check.start_background_check(engines)
    assert proc is not None
    assert proc.wait(timeout=30) == -signal.SIGALRM
    assert _lock_is_free(cache)


def test_nothing_is_started_without_a_cuda_aot_package_or_after_a_passed_check(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(loader_check, "has_nvidia_gpu", lambda: True)
    cpu_only = _engine_dir(
        tmp_path, {"cfg": {"file": "cfg.aot.pt2", "backend": "aot", "device_type": "cpu", "size": 4}}
    )
    assert loader_check.cuda_aot_package(cpu_only) is None
    assert loader_check.start_background_check(cpu_only) is None
    assert loader_check.start_background_check(tmp_path / "no-such-dir") is None
    assert loader_check.start_background_check(None) is None

    assert not loader_check.probably_checked()
    cache.mkdir(parents=True, exist_ok=True)
    other = cache / f"{loader_check.MARKER_PREFIX}0000"
    other.write_text(json.dumps({"executable": "/other/python", "torch": torch.__version__}))
    assert not loader_check.probably_checked()
    (cache / f"{loader_check.MARKER_PREFIX}0001").write_text(
        json.dumps({"executable": sys.executable, "torch": torch.__version__})
    )
    assert loader_check.probably_checked()


def test_a_passed_check_leaves_a_marker_naming_interpreter_and_torch(cache: Path, tmp_path: Path) -> None:
    import torch

    class Passing(AOTBackend):
        LOADER_CHECK = "pass"

    Passing().check_loader(tmp_path / "stage.pt2", 0)
    marker = loader_check_marker(Passing.LOADER_CHECK)
    assert json.loads(marker.read_text()) == {"executable": sys.executable, "torch": torch.__version__}
    assert loader_check.probably_checked()
