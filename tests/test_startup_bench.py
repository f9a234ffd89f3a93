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
        "--repeat",
        "1",
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


def test_the_table_shows_each_modes_median_run_and_the_spread() -> None:
    from accel.bench.startup import PARTS, markdown, typical_runs

    def run(mode: str, total: float) -> dict:
        parts = dict.fromkeys(PARTS, 0.0)
        parts["prepare"] = total
        return {
            "mode": mode,
            "total_s": total,
            "parts_s": parts,
            "first_call_ms_per_step": 1.0,
            "warm_call_ms_per_step": 1.0,
            "loaded_stages": 2,
            "compiled_stages": 0,
        }

    result = {
        "case": {"target": "p.json", "devices": 1, "steps": 50, "precision": "fp16"},
        "environment": {"gpus": 1, "gpu": "GPU"},
        "versions": {"torch": "t", "diffusers": "d"},
        "date": "today",
        "exports": [],
        "runs": [
            run("aot", 21.0),
            run("aot", 19.0),
            run("aot", 25.0),
            run("eager", 23.0),
            run("eager", 24.0),
        ],
    }
    typical = typical_runs(result)
    assert [(r["mode"], r["total_s"], r["totals_s"]) for r in typical] == [
        ("aot", 21.0, [21.0, 19.0, 25.0]),
        ("eager", 23.0, [23.0, 24.0]),  # of an even count, the lower middle
    ]
    table = markdown(result)
    assert "| aot | 21.0 | 3: 19.0-25.0 |" in table and "| eager | 23.0 | 2: 23.0-24.0 |" in table
    result["runs"].append({"mode": "inductor", "error": "no JSON summary (see the log)"})
    assert "| inductor | failed: no JSON summary (see the log) |" in markdown(result)
