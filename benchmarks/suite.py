"""Run the speed suite (A-E) for one model and size and write its JSON result; see ``accel bench --help``.

    python benchmarks/suite.py --model sdxl -o docs/benchmarks/suite/sdxl-1024.json
    python benchmarks/suite.py --model sdxl --height 2048 --width 2048 --configs A,B,D -o sdxl-2048.json
    python benchmarks/suite.py --model sd3 --tiny --steps 3 --configs A,C -o /tmp/dry.json   # CPU dry run

The same as ``accel bench --model ...``, without the CLI's dependencies (for the bare GPU host).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from accel.bench.configs import DEFAULT_CONFIGS, DEFAULT_EXPERT_MODE, EXPERT_MODES, WINDOW_MODES
from accel.bench.speed import (
    SuiteSettings,
    parse_names,
    parse_schedule,
    run_suite,
    save,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="sdxl", choices=["sdxl", "sd3"])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--configs", type=parse_names, default=DEFAULT_CONFIGS)
    parser.add_argument("--backends", type=parse_names, default=("inductor",))
    parser.add_argument("--window-modes", type=parse_names, default=WINDOW_MODES)
    parser.add_argument("--schedule", type=parse_schedule, default="adaptive")
    parser.add_argument("--engines", action="append", default=[], help="one per backend, in order")
    parser.add_argument("--plan", default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--expert-mode", choices=EXPERT_MODES, default=DEFAULT_EXPERT_MODE)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = SuiteSettings(
        model=args.model,
        height=args.height,
        width=args.width,
        steps=args.steps,
        repeat=args.repeat,
        configs=args.configs,
        backends=args.backends,
        window_modes=args.window_modes,
        schedule=args.schedule,
        engines=tuple(args.engines),
        plan=args.plan,
        tiny=args.tiny,
        expert_mode=args.expert_mode,
    )
    result = run_suite(
        settings,
        on_phase=lambda phase: logging.info("phase: %s", phase),
        on_partial=lambda partial: save(partial, args.output),  # a run cut short keeps what it measured
    )
    save(result, args.output)
    logging.info("wrote %s\n%s", args.output, json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
