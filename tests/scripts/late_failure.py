"""A worker for tests/test_launch.py: rank 0 fails (an EngineError) and is slow to exit; rank 1 waits.

Rank 1 is stopped by accel's failure monitor before rank 0's process ends, the way a rank whose error
takes a while to unwind (teardown, a long traceback) ends after the peers it told to stop.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import accel
from accel.compile.store import EngineError


def main() -> None:
    torch.set_num_threads(1)
    acc = accel.Accelerator(devices=2, accelerator="cpu", collective_timeout_s=60.0)
    acc.launch()
    if acc.rank == 0:
        error = EngineError("engine 'cfg.full.64x64.b1' cannot be used: file truncated")
        acc.report_failure(error)
        time.sleep(3.0)
        raise error
    dist.barrier()  # rank 1 waits here until the failure monitor stops it


if __name__ == "__main__":
    main()
