"""accel bench --startup: a real `accel run` process timed to its first image, split into parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from accel.testing import build_pipeline


def test_startup_suite_times_a_real_run(tmp_path: Path) -> None:
    folder = tmp_path / "sdxl"
    build_pipeline("sdxl").save_pretrained(folder)
    stem = tmp_path / "startup"
    cmd = [
        "bench",
        "--startup",
        str(folder),
        "--modes",
        "eager",
        "--steps",
        "2",
        "--work",
        str(tmp_path / "w"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "accel", *cmd, "-o", str(stem)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(stem.with_suffix(".json").read_text())
    (run,) = result["runs"]
    assert run["mode"] == "eager" and run["returncode"] == 0, run
    # Two calls of one image each: the first image's time, and a warm call's time per step.
    assert (tmp_path / "w" / "eager-0.png").is_file() and (tmp_path / "w" / "eager-1.png").is_file()
    assert run["warm_call_ms_per_step"] is not None and run["warm_call_ms_per_step"] > 0
    assert run["loaded_stages"] == run["compiled_stages"] == 0
    parts = run["parts_s"]
    assert all(value >= 0 for value in parts.values()), parts
    # The parts split the time from process start to the image written, with nothing left over.
    assert abs(sum(parts.values()) - run["total_s"]) < 1e-6
    assert 0 < run["total_s"] <= run["process_s"]
    assert "| eager |" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").stat().st_size > 0
