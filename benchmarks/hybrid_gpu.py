"""One GPU vs CFG split vs hybrid (per window guidance mode) on 2 GPUs, full-size model, random weights.

Times the fp16 eager denoising loop of every mode in one process tree (the one-GPU baseline in the parent,
then every 2-GPU mode in one launch of 2 processes), and reports for each hybrid mode the window the
schedule chose, the bytes each rank sent per pipelined step, and its deviation from the exact output
(latent mean/max abs error and decoded-image PSNR against the one-GPU run at the same seed; CFG split is
listed too, as the exact 2-GPU mode). The plan (stages by measured cost) is made once, by the first hybrid
mode's first call, and shared by the others. ``pipeline_bytes_per_step``: each rank's bytes sent in the
window divided by the pipelined steps (boundary tensors, the prediction, and the one-off hand-over of
``cached``/``off``; the last window step sends no boundary). Writes a JSON report.

    python benchmarks/hybrid_gpu.py --model sdxl --steps 50 -o hybrid-sdxl.json
    python benchmarks/hybrid_gpu.py --model sd3 --steps 50 -o hybrid-sd3.json
    python benchmarks/hybrid_gpu.py --model sdxl --schedule 15,20 -o fixed.json   # a fixed window
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import accel
from accel.testing import full_size_pipeline
from accel.testing.measure import psnr, timed_generate
from accel.wrapper import find_denoiser

PROMPT = "an astronaut riding a horse on the moon, detailed, 8k"
GUIDANCE = {"sdxl": 5.0, "sd3": 7.0}  # the published settings
MODES = ("cfg", "reference", "cached", "off")


def _denoiser(pipe: Any) -> torch.nn.Module:
    return find_denoiser(pipe)[1]


def _generate(pipe: Any, denoiser: torch.nn.Module, args: argparse.Namespace, steps: int) -> dict[str, Any]:
    run = timed_generate(
        pipe,
        denoiser,
        "cuda",
        PROMPT,
        height=args.height,
        width=args.width,
        steps=steps,
        guidance=args.guidance,
        seed=args.seed,
    )
    return {"loop_s": run["loop_s"], "latents": run["latents"], "image": np.asarray(run["images"])}


def _measure(pipe: Any, denoiser: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    _generate(pipe, denoiser, args, args.warmup_steps)  # warm-up (and planning, for hybrid)
    _generate(pipe, denoiser, args, args.steps)  # a full run: the adaptive window may start late
    runs = [_generate(pipe, denoiser, args, args.steps) for _ in range(args.repeat)]
    report = getattr(pipe, "last_report", None)
    return {
        "loop_s": [r["loop_s"] for r in runs],
        "loop_median_s": statistics.median(r["loop_s"] for r in runs),
        "latents": runs[-1]["latents"],
        "image": runs[-1]["image"],
        "report": report,
    }


def _worker(acc: accel.Accelerator, args: argparse.Namespace) -> dict[str, Any]:
    pipe = full_size_pipeline(args.model, dtype=torch.float16, device=acc.device)
    denoiser = _denoiser(pipe)
    results: dict[str, Any] = {}
    plan_file: str | None = None  # planned once (first hybrid mode), then shared: same stages for all
    for mode in args.modes:
        if mode == "one_gpu":
            continue
        settings: dict[str, Any] = {"strategy": "cfg"}
        if mode != "cfg":
            settings = {"strategy": "hybrid", "window_guidance": mode, "schedule": args.schedule}
            if plan_file is not None:
                settings["plan"] = plan_file
        wrapped = accel.wrap(pipe, accelerator=acc, **settings)
        torch.cuda.reset_peak_memory_stats()
        result = _measure(wrapped, denoiser, args)
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        report = result.pop("report")
        per_rank: list[Any] = [None, None]
        dist.all_gather_object(per_rank, vars(report) if report is not None else None)
        result["reports"] = per_rank
        plan = getattr(wrapped.runtime, "plan", None)
        if plan is not None and plan_file is None:
            plan_file = str(args.output.with_suffix(".plan.json"))
            if acc.rank == 0:
                plan.save(plan_file)
            acc.barrier()
            results["plan"] = {
                "stages": [list(map(list, st.segments)) for st in plan.stages],
                "layout": plan.layout,
                "balance": plan.balance,
                "bytes_per_step": plan.bytes_per_step,
                "stage_cost_ms": [st.cost_ms for st in plan.stages],
                "file": plan_file,
            }
        results[mode] = result
        accel.unwrap(wrapped)
    return results


def _schedule(text: str) -> Any:
    if "," in text:
        start, end = (int(v) for v in text.split(","))
        return (start, end)
    return text


def _summary(
    name: str, run: dict[str, Any], exact: dict[str, Any] | None, one_gpu_s: float | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "loop_s": run["loop_s"],
        "loop_median_s": run["loop_median_s"],
        "peak_mem_gib": run.get("peak_mem_gib"),
    }
    if one_gpu_s is not None:
        out["speedup_vs_one_gpu"] = one_gpu_s / run["loop_median_s"]
    if exact is not None:
        diff = (run["latents"] - exact["latents"]).abs()
        out["latent_mean_abs_err"] = float(diff.mean())
        out["latent_max_abs_err"] = float(diff.max())
        out["image_psnr_db"] = psnr(exact["image"], run["image"])
    reports = run.get("reports")
    if reports:
        r0 = reports[0] or {}
        out["tau1"], out["tau2"], out["window"] = r0.get("tau1"), r0.get("tau2"), r0.get("window")
        out["steps"], out["phase_seconds_rank0"] = r0.get("steps"), r0.get("phase_seconds")
        pipelined = (r0.get("steps") or {}).get("pipeline", 0)
        out["pipeline_bytes_per_step"] = [
            (r or {}).get("pipeline_bytes", 0) / pipelined if pipelined else 0 for r in reports
        ]
        out["bytes_sent_per_call"] = [(r or {}).get("bytes_sent") for r in reports]
        out["plan_seconds"] = r0.get("plan_seconds")
        out["rates"] = [None if math.isnan(v) else v for v in r0.get("rates", ())]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdxl", choices=["sdxl", "sd3"])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--guidance", type=float, default=None, help="default: 5.0 for SDXL, 7.0 for SD3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--schedule", type=_schedule, default="adaptive", help="adaptive | always | never | START,END"
    )
    parser.add_argument(
        "--modes",
        type=lambda s: [m for m in s.split(",") if m],
        default=["one_gpu", *MODES],
        help="comma-separated subset of one_gpu," + ",".join(MODES),
    )
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    if args.guidance is None:
        args.guidance = GUIDANCE[args.model]
    unknown = set(args.modes) - {"one_gpu", *MODES}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")

    t0 = time.perf_counter()
    single = None
    if "one_gpu" in args.modes:
        pipe = full_size_pipeline(args.model, dtype=torch.float16, device="cuda:0")
        torch.cuda.reset_peak_memory_stats()
        single = _measure(pipe, _denoiser(pipe), args)
        single["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del pipe
        torch.cuda.empty_cache()
    runs = accel.Accelerator(devices=2, accelerator="cuda").launch(_worker, args)

    one_s = single["loop_median_s"] if single is not None else None
    exact = single if single is not None else runs.get("cfg")
    report: dict[str, Any] = {
        "model": args.model,
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "guidance": args.guidance,
        "schedule": args.schedule,
        "exact_reference": "one_gpu" if single is not None else "cfg",
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "date": time.strftime("%Y-%m-%d"),
        "modes": {},
    }
    if single is not None:
        report["modes"]["one_gpu"] = _summary("one_gpu", single, None, one_s)
    report["plan"] = runs.pop("plan", None)
    for mode, run in runs.items():
        report["modes"][mode] = _summary(mode, run, exact, one_s)
    report["wall_s"] = time.perf_counter() - t0
    args.output.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
