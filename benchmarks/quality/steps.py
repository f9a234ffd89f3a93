"""Where the adaptive window lands at fewer than 50 steps, and what it costs: the switch-rule constants
as published (chosen for 50 steps, taken as they are) against the same constants scaled to the call's
step count, on the trained digit models (accel.bench.quality).

Every variant is passed as explicit schedule constants, so the comparison does not depend on accel's
defaults. Writes one JSON file per (family, steps) run into the output folder and prints a table.

    python benchmarks/quality/steps.py [OUT_DIR] [--seeds N]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from accel.bench.quality import QualityMode, report_dict, run_quality

#: (family, steps, family defaults at 50 steps)
RUNS: list[tuple[str, int, dict[str, Any]]] = [
    ("sdxl", 16, dict(lookback=12, eps=4e-4, k=5, tau_cap=15)),
    ("sdxl", 20, dict(lookback=12, eps=4e-4, k=5, tau_cap=15)),
    ("sd3", 28, dict(lookback=15, eps=5e-4, k=5, tau_cap=20)),
]


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def scaled(constants: dict[str, Any], steps: int, *, keep_k: bool = False) -> dict[str, Any]:
    """The constants of a 50-step run scaled to ``steps`` (as ``ScheduleSettings`` scales its defaults)."""
    f = steps / 50
    lookback = max(2, _half_up(constants["lookback"] * f))
    return dict(
        lookback=lookback,
        eps=constants["eps"] / f,
        k=constants["k"] if keep_k else max(1, _half_up(constants["k"] * f)),
        tau_cap=max(1, _half_up(constants["tau_cap"] * f)),
    )


def modes_for(constants: dict[str, Any], steps: int) -> list[QualityMode]:
    variants = {
        "unscaled": constants,
        "scaled": scaled(constants, steps),
        "scaled-k5": scaled(constants, steps, keep_k=True),
    }
    modes = [QualityMode("exact", "exact")]
    for guidance in ("cached", "reference"):
        for label, c in variants.items():
            modes.append(QualityMode(f"{guidance}/{label}", "hybrid", guidance, dict(mode="adaptive", **c)))
    return modes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="quality-steps")
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family, steps, constants in RUNS:
        modes = modes_for(constants, steps)
        report = run_quality(
            [family], seeds=tuple(range(args.seeds)), steps=steps, modes=lambda _f, m=modes: m
        )
        data = report_dict(report)
        (out / f"{family}-{steps}.json").write_text(json.dumps(data, indent=1, default=str))
        for r in report.families[0].modes:
            if r.mode.strategy == "exact":
                continue
            rows.append(
                f"| {family} | {steps} | {r.mode.name} | {r.mode.schedule} | {r.window} | "
                f"{r.psnr_mean_db:.1f} dB | {r.psnr_min_db:.1f} dB | {r.latent_mae:.2e} | {100 * r.accuracy:.0f} % |"
            )
            print(rows[-1], flush=True)
    (out / "table.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
