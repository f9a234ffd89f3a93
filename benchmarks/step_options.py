"""One denoiser call per compile option, side by side in one process: the step-speed study on one GPU.

    python benchmarks/step_options.py --model sdxl --batch 1 --batch 2 -o docs/benchmarks/step/sdxl-1024
    python benchmarks/step_options.py --model sd3 --options default,sdpa-cudnn,recipe -o /tmp/sd3-step
    python benchmarks/step_options.py --tiny --model sd3 --size 128 --options eager,default -o /tmp/step

The whole denoiser (U-Net or transformer) of the full-size architecture (random weights, fp16) is called
at 1024² with the CFG batch given (``--batch 2`` is the unsplit one-GPU step, ``--batch 1`` one branch of
the two-GPU CFG split), compiled by inductor once per option: each option alone on top of inductor's
defaults, then combined. For each: the median milliseconds per call (CUDA events, after warm-up calls),
the compile time, and the output against eager at the same inputs (max abs difference and relative L2
error; every option is math-preserving, so only floating-point reordering may show). Writes OUT.json
and OUT.md. ``--tiny`` runs the tiny pipelines (a dry run on CPU).

``--component vae`` times the VAE decoder instead (in the dtype the pipeline decodes in: fp32 for SDXL's
upcast VAE), one latent image per batch row.

Options: eager; default (inductor); conv_1x1_as_mm; coordinate_descent; fused_qkv (diffusers'
``fuse_qkv_projections``); channels_last (weights and latents); sdpa-flash, sdpa-cudnn, sdpa-efficient
(the only SDPA backend allowed while compiling and calling); recipe (conv_1x1_as_mm + coordinate_descent
+ fused_qkv); autotune (recipe + max_autotune: minutes per shape).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

OPTIONS = (
    "eager",
    "default",
    "conv_1x1_as_mm",
    "coordinate_descent",
    "fused_qkv",
    "channels_last",
    "sdpa-flash",
    "sdpa-cudnn",
    "sdpa-efficient",
    "recipe",
    "autotune",
)
#: inductor configuration of each option (fused_qkv, channels_last and SDPA act on the model or the call).
INDUCTOR = {
    "conv_1x1_as_mm": {"conv_1x1_as_mm": True},
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "recipe": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True},
    "autotune": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "max_autotune": True},
}
FUSED = ("fused_qkv", "recipe", "autotune")


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", choices=("sdxl", "sd3"), default="sdxl")
    p.add_argument("--component", choices=("denoiser", "vae"), default="denoiser")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--batch", type=int, action="append", help="CFG rows per call; repeat (default 2)")
    p.add_argument("--options", default=",".join(o for o in OPTIONS if o != "autotune"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="the tiny pipelines, fp32 (a dry run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("-o", "--output", type=Path, required=True, help="output stem (.json, .md)")
    return p.parse_args()


@contextlib.contextmanager
def _applied(option: str, model: torch.nn.Module) -> Iterator[None]:
    """The model and call context of ``option``, undone afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = option in FUSED and hasattr(model, "fuse_qkv_projections")
    if fused:
        model.fuse_qkv_projections()
    if option == "channels_last":
        model.to(memory_format=torch.channels_last)
    backend = {
        "sdpa-flash": "FLASH_ATTENTION",
        "sdpa-cudnn": "CUDNN_ATTENTION",
        "sdpa-efficient": "EFFICIENT_ATTENTION",
    }
    context = (
        sdpa_kernel(getattr(SDPBackend, backend[option])) if option in backend else contextlib.nullcontext()
    )
    try:
        with context:
            yield
    finally:
        if option == "channels_last":
            model.to(memory_format=torch.contiguous_format)
        if fused:
            model.unfuse_qkv_projections()


def _inputs(model: torch.nn.Module, batch: int, size: int, option: str) -> tuple[list[Any], dict[str, Any]]:
    from accel.compile.stage import DecoderStage
    from accel.models import adapt
    from accel.models.base import InputShape

    param = next(model.parameters())
    if isinstance(model, DecoderStage):
        channels = model.decoder.conv_in.in_channels
        gen = torch.Generator("cpu").manual_seed(0)
        z = torch.randn(batch, channels, size // 8, size // 8, generator=gen).to(param.device, param.dtype)
        args, kwargs = [z], {}
    else:
        shape = InputShape(batch=batch, height=size, width=size, dtype=param.dtype, device=param.device)
        args, kwargs = adapt(model).example_inputs(shape)
        args, kwargs = list(args), dict(kwargs)
    if option == "channels_last":
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            args[0] = args[0].contiguous(memory_format=torch.channels_last)
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            kwargs["hidden_states"] = kwargs["hidden_states"].contiguous(memory_format=torch.channels_last)
    return args, kwargs


def _output(target: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> torch.Tensor:
    """The call's output tensor (a denoiser takes ``return_dict``; a decoder stage returns a tuple)."""
    if kwargs or len(args) != 1:
        return target(*args, **kwargs, return_dict=False)[0]
    return target(*args)[0]


def _timed(fn: Callable[[], torch.Tensor], warmup: int, repeat: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - began))
    return times


def measure(
    model: torch.nn.Module, option: str, batch: int, args: argparse.Namespace, ref: torch.Tensor
) -> dict:
    """One option at one batch: ms per call, compile seconds, and the output against eager."""
    device = next(model.parameters()).device
    torch._dynamo.reset()
    with _applied(option, model), torch.no_grad():
        call_args, call_kwargs = _inputs(model, batch, args.size, option)
        target: Callable[..., Any] = model
        if option != "eager":
            target = torch.compile(model, dynamic=False, options=INDUCTOR.get(option) or None)

        def call() -> torch.Tensor:
            return _output(target, call_args, call_kwargs)

        began = time.perf_counter()
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compile_s = time.perf_counter() - began
        times = _timed(call, args.warmup, args.repeat, device)
    diff = (out.float() - ref.float()).contiguous()
    return {
        "option": option,
        "batch": batch,
        "ms": statistics.median(times),
        "ms_min": min(times),
        "first_call_s": compile_s,
        "max_abs_diff": float(diff.abs().max()),
        "rel_l2": float(diff.norm() / ref.float().norm().clamp_min(1e-30)),
    }


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"{result['model']} {result['size']}², {'VAE decoder' if result.get('component') == 'vae' else 'whole denoiser'} "
        f"per call, {env.get('gpu') or 'CPU'}, torch "
        f"{result['versions'].get('torch')}, diffusers {result['versions'].get('diffusers')}, {result['date']}.",
        "",
        "| batch | option | ms per call | vs default | first call s | max abs diff vs eager | rel. L2 vs eager |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        base = next(
            (r["ms"] for r in result["rows"] if r["batch"] == row["batch"] and r["option"] == "default"), None
        )
        ratio = f"{base / row['ms']:.3f}x" if base else "-"
        lines.append(
            f"| {row['batch']} | {row['option']} | {row['ms']:.2f} | {ratio} | {row['first_call_s']:.1f} | "
            f"{row['max_abs_diff']:.3g} | {row['rel_l2']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = _arguments()
    options = [o for o in args.options.split(",") if o]
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SystemExit(f"--options {', '.join(unknown)}: choose from {', '.join(OPTIONS)}.")
    from accel.bench.speed import environment, versions
    from accel.testing import build_pipeline, full_size_pipeline
    from accel.wrapper import find_denoiser

    if args.tiny:
        pipe = build_pipeline(args.model, device=args.device)
    else:
        pipe = full_size_pipeline(args.model, device=args.device)
    model = find_denoiser(pipe)[1].eval().requires_grad_(False)
    if args.component == "vae":
        from accel.compile.stage import DecoderStage, decoder_dtype

        dtype = decoder_dtype(pipe.vae, next(model.parameters()).dtype)
        model = DecoderStage(pipe.vae.decoder.to(dtype).eval().requires_grad_(False))
    result: dict[str, Any] = {
        "model": args.model,
        "component": args.component,
        "size": args.size,
        "environment": environment(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": [],
    }
    for batch in args.batch or [2]:
        with torch.no_grad():
            call_args, call_kwargs = _inputs(model, batch, args.size, "eager")
            ref = _output(model, call_args, call_kwargs)
        for option in options:
            row = measure(model, option, batch, args, ref)
            result["rows"].append(row)
            print(
                f"batch {batch} {option}: {row['ms']:.2f} ms/call (first call {row['first_call_s']:.1f} s)",
                flush=True,
            )
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
            args.output.with_suffix(".md").write_text(markdown(result))
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
