"""Start-up on one GPU: process start to the first image written, per backend (accel.bench.startup).

    python benchmarks/startup.py --model sdxl --work /tmp/startup -o docs/benchmarks/startup/sdxl-1024

Without a model folder at WORK/MODEL, the full-size architecture is written there first (random weights,
fp16, save_pretrained), so every run loads it as any diffusers folder; a one-device plan is made with
``accel plan``. Then the engines each mode needs are exported and every mode is timed once in a fresh
process: eager, inductor-cold, inductor (engines), aot (engines). Writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from accel.bench.startup import MODES, StartupCase, prepare, save, suite

ARCHES = {"sdxl": "sdxl-base-1.0", "sd3": "sd3-medium"}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=sorted(ARCHES), default="sdxl")
    parser.add_argument("--work", type=Path, required=True, help="model folder, plan, engines and images")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--repeat", type=int, default=3, help="fresh runs per mode (the table shows the median)"
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output stem (.json/.md/.png)")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    folder, plan = work / args.model, work / f"{args.model}-{args.size}.plan.json"
    log = work / "startup.log"
    if not (folder / "model_index.json").exists():
        started = time.perf_counter()
        code = (
            f"from accel.testing import full_size_pipeline; "
            f"full_size_pipeline({args.model!r}, device={args.device!r}).save_pretrained({str(folder)!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        print(f"wrote {folder} in {time.perf_counter() - started:.1f} s", flush=True)
    prepare(folder, plan, size=args.size, device=args.device, log=log)
    case = StartupCase(target=str(plan), plan=str(plan), steps=args.steps)
    # Saved after every mode, so a run cut short still leaves what it measured.
    modes = [m for m in args.modes.split(",") if m]
    suite(case, modes, work, log, lambda r: save(r, args.output), repeat=args.repeat)
    print(Path(args.output).with_suffix(".md").read_text(), flush=True)


if __name__ == "__main__":
    main()
