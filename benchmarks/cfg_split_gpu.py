"""CFG split on 2 GPUs vs one GPU, full-size architecture with random weights.

Checks that ``strategy="cfg"`` reproduces the one-GPU output (fp32: max abs latent difference) and
times the fp16 denoising loop of both (eager), side by side in one run. Writes a JSON report.

    python benchmarks/cfg_split_gpu.py --model sdxl --height 1024 --width 1024 --steps 50 -o cfg.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import accel
from accel.testing import full_size_pipeline
from accel.testing.measure import psnr, timed_generate
from accel.wrapper import find_denoiser

PROMPT = "an astronaut riding a horse on the moon, detailed, 8k"


def _denoiser(pipe: Any) -> torch.nn.Module:
    return find_denoiser(pipe)[1]


def _generate(
    pipe: Any, denoiser: torch.nn.Module, args: argparse.Namespace, *, steps: int, output_type: str
) -> tuple[Any, float]:
    run = timed_generate(
        pipe,
        denoiser,
        "cuda",
        PROMPT,
        height=args.height,
        width=args.width,
        steps=steps,
        guidance=args.guidance,
        seed=0,
        output_type=output_type,
    )
    return run["images"], run["loop_s"]


def _measure(pipe: Any, denoiser: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """fp32 latents (exactness), then fp16 warm-up and timed runs (speed) on an already built pipeline."""
    result: dict[str, Any] = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pipe.to(dtype=torch.float32)
    latents, seconds = _generate(pipe, denoiser, args, steps=args.steps, output_type="latent")
    result["fp32_latents"] = latents.float().cpu()
    result["fp32_loop_s"] = seconds
    pipe.to(dtype=torch.float16)
    _generate(pipe, denoiser, args, steps=args.warmup_steps, output_type="latent")
    times = []
    image = None
    for _ in range(args.repeat):
        image, seconds = _generate(pipe, denoiser, args, steps=args.steps, output_type="np")
        times.append(seconds)
    result["fp16_loop_s"] = times
    result["fp16_image"] = np.asarray(image)
    result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def _split_worker(acc: accel.Accelerator, args: argparse.Namespace) -> dict[str, Any]:
    pipe = full_size_pipeline(args.model, dtype=torch.float32, device=acc.device)
    denoiser = _denoiser(pipe)
    wrapped = acc.wrap(pipe)
    result = _measure(wrapped, denoiser, args)
    result["report"] = vars(wrapped.last_report) if wrapped.last_report else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdxl", choices=["sdxl", "sd3"])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()

    t0 = time.perf_counter()
    pipe = full_size_pipeline(args.model, dtype=torch.float32, device="cuda:0")
    single = _measure(pipe, _denoiser(pipe), args)
    del pipe
    torch.cuda.empty_cache()
    split = accel.Accelerator(devices=2, accelerator="cuda").launch(_split_worker, args)

    diff = (split["fp32_latents"] - single["fp32_latents"]).abs()
    one, two = statistics.median(single["fp16_loop_s"]), statistics.median(split["fp16_loop_s"])
    report = {
        "model": args.model,
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "guidance": args.guidance,
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "date": time.strftime("%Y-%m-%d"),
        "fp32_max_abs_latent_diff": float(diff.max()),
        "fp32_mean_abs_latent_diff": float(diff.mean()),
        "fp32_latent_absmax": float(single["fp32_latents"].abs().max()),
        "fp32_loop_s": {"one_gpu": single["fp32_loop_s"], "cfg_split_2gpu": split["fp32_loop_s"]},
        "fp16_loop_s": {"one_gpu": single["fp16_loop_s"], "cfg_split_2gpu": split["fp16_loop_s"]},
        "fp16_loop_median_s": {"one_gpu": one, "cfg_split_2gpu": two},
        "fp16_speedup": one / two,
        "fp16_image_psnr_db": psnr(single["fp16_image"], split["fp16_image"]),
        "peak_mem_gib": {"one_gpu": single["peak_mem_gib"], "cfg_split_rank0": split["peak_mem_gib"]},
        "split_report": split["report"],
        "wall_s": time.perf_counter() - t0,
    }
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
