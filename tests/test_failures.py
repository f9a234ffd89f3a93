"""Failures on one rank end every rank, with the error, without hanging."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "two_ranks.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch_two(mode: str, timeout: float = 90.0) -> tuple[list[int], list[str], float]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE="2",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            NODE_RANK="0",
            PYTHONUNBUFFERED="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    start = time.monotonic()
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"mode {mode}: a rank was still running after {timeout} s (hang)")
        outputs.append(out)
    return [p.returncode for p in procs], outputs, time.monotonic() - start


def test_exception_on_rank1_ends_both_ranks() -> None:
    codes, outputs, seconds = _launch_two("fail-rank1")
    assert codes[0] != 0 and codes[1] != 0, (codes, outputs)
    assert seconds < 60, seconds
    assert "injected failure on rank 1" in outputs[1]
    # rank 0 was waiting in a collective: it must stop with rank 1's error, not a timeout
    assert "rank 1 failed with RuntimeError: injected failure on rank 1" in outputs[0], outputs[0]
    # A callback registered with Accelerator.on_peer_failure ran first, with the cause.
    assert "before stopping: rank 1 failed with RuntimeError: injected failure on rank 1" in outputs[0]


def test_mismatched_settings_fail_on_every_rank() -> None:
    codes, outputs, _ = _launch_two("mismatch")
    assert codes == [1, 1], (codes, outputs)
    for out in outputs:
        assert "RankMismatchError: ranks disagree about accel settings" in out, out
