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

On a GPU each option's call is replayed as one CUDA graph, as accel's runtime replays a compiled stage
(``--no-graphs`` launches the kernels per call instead).

An option is one atom or several joined by ``+`` (``sdpa-cudnn+fused_qkv``). Atoms: eager (no compile);
default (inductor); conv_1x1_as_mm; coordinate_descent; fused_qkv (diffusers' ``fuse_qkv_projections``);
channels_last (weights and latents); sdpa-math, sdpa-flash, sdpa-cudnn, sdpa-efficient (the SDPA
backend allowed while compiling and calling); gemm-autotune (``max_autotune_gemm``); autotune
(``max_autotune``: minutes per shape); blaslt (cuBLASLt as the preferred BLAS library for the ATen
matrix products); cudnn-benchmark (``torch.backends.cudnn.benchmark``: cuDNN times its convolution
algorithms per shape at the first call and keeps the fastest). ``recipe`` names conv_1x1_as_mm +
coordinate_descent + fused_qkv.

``--profile`` adds, per option, where the GPU time of one call goes: kernel time summed by kind
(matrix products, convolutions, attention, generated Triton kernels, other) from torch's profiler, with
the busiest kernels named, and the share of the call the GPU is busy. Every run also counts the eager
call's FLOPs by the same kinds (``torch.utils.flop_counter``), so a profiled row says how many TFLOP/s
each kind of kernel reaches; ``--device meta`` counts them without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from accel.compile.backends import SEARCHED_KERNELS_LAUNCHER
from accel.compile.work import CompilerWork
from accel.models import fusion

#: option atoms; an option given on the command line is one atom or several joined by ``+``
ATOMS = (
    "eager",
    "default",
    "conv_1x1_as_mm",
    "coordinate_descent",
    "fused_qkv",
    "channels_last",
    "sdpa-math",
    "sdpa-flash",
    "sdpa-cudnn",
    "sdpa-efficient",
    "gemm-autotune",
    "autotune",
    "blaslt",
    "cudnn-benchmark",
)
#: named combinations
COMBINED = {
    "recipe": ("conv_1x1_as_mm", "coordinate_descent", "fused_qkv"),
}
OPTIONS = (*ATOMS, *COMBINED)
#: inductor configuration of each atom (fused_qkv, channels_last and SDPA act on the model or the call).
INDUCTOR = {
    "conv_1x1_as_mm": {"conv_1x1_as_mm": True},
    # The launcher accel's inductor engines use, so a graph read back from the cache keeps its searches.
    "coordinate_descent": {"coordinate_descent_tuning": True, **SEARCHED_KERNELS_LAUNCHER},
    "gemm-autotune": {"max_autotune_gemm": True},
    "autotune": {"max_autotune": True},
}
SDPA = {
    "sdpa-math": "MATH",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
}
DEFAULT_OPTIONS = (
    "eager,eager+sdpa-flash,eager+sdpa-cudnn,eager+sdpa-efficient,default,sdpa-cudnn,fused_qkv,"
    "channels_last,conv_1x1_as_mm,coordinate_descent,recipe"
)


def atoms(option: str) -> tuple[str, ...]:
    """The atoms of ``option`` (``a+b``, a named combination, or one atom); unknown ones raise."""
    found: list[str] = []
    for part in option.split("+"):
        for atom in COMBINED.get(part, (part,)):
            if atom not in ATOMS:
                raise SystemExit(f"option {option!r}: {atom!r} is not one of {', '.join(OPTIONS)}.")
            found.append(atom)
    if "eager" in found and any(a in INDUCTOR for a in found):
        raise SystemExit(f"option {option!r}: inductor settings do not apply to eager.")
    return tuple(dict.fromkeys(found))


def inductor_options(option: str) -> dict[str, bool]:
    """The inductor configuration ``option`` compiles with."""
    merged: dict[str, bool] = {}
    for atom in atoms(option):
        merged.update(INDUCTOR.get(atom, {}))
    return merged


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", choices=("sdxl", "sd3"), default="sdxl")
    p.add_argument("--component", choices=("denoiser", "vae"), default="denoiser")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--batch", type=int, action="append", help="CFG rows per call; repeat (default 2)")
    p.add_argument("--options", default=DEFAULT_OPTIONS, help="comma-separated; join atoms with +")
    p.add_argument("--no-graphs", action="store_true", help="launch kernels per call, no CUDA graph replay")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="the tiny pipelines, fp32 (a dry run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", action="store_true", help="GPU kernel time by kind per option")
    p.add_argument("-o", "--output", type=Path, required=True, help="output stem (.json, .md)")
    return p.parse_args()


@contextlib.contextmanager
def _applied(option: str, model: torch.nn.Module) -> Iterator[None]:
    """The model and call context of ``option``, undone afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    parts = atoms(option)
    fused = "fused_qkv" in parts and fusion.can_fuse(model)
    if fused:
        fusion.fuse(model)
    if "channels_last" in parts:
        model.to(memory_format=torch.channels_last)
    backends = [getattr(SDPBackend, SDPA[a]) for a in parts if a in SDPA]
    context = sdpa_kernel(backends) if backends else contextlib.nullcontext()
    blas = torch.backends.cuda.preferred_blas_library()
    benchmark = torch.backends.cudnn.benchmark
    if "blaslt" in parts:
        torch.backends.cuda.preferred_blas_library("cublaslt")
    torch.backends.cudnn.benchmark = benchmark or "cudnn-benchmark" in parts
    try:
        with context:
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cuda.preferred_blas_library(blas)
        if "channels_last" in parts:
            model.to(memory_format=torch.contiguous_format)
        if fused:
            fusion.unfuse(model)


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
    if "channels_last" in atoms(option):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            args[0] = args[0].contiguous(memory_format=torch.channels_last)
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            kwargs["hidden_states"] = kwargs["hidden_states"].contiguous(memory_format=torch.channels_last)
    return args, kwargs


SdpaFunction = Callable[..., torch.Tensor]


@contextlib.contextmanager
def _sdpa_wrapped(wrap: Callable[[SdpaFunction], SdpaFunction]) -> Iterator[None]:
    """``F.scaled_dot_product_attention`` replaced by ``wrap(the function)`` inside (diffusers' attention
    processors look it up at every call)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = wrap(original)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def _sdpa_choices() -> Iterator[dict[str, int]]:
    """Counts of the SDPA backend torch picks by default for each attention call made inside
    (``"<backend> q<shape>"``), read from torch's own chooser."""
    from torch.nn.attention import SDPBackend

    counts: dict[str, int] = {}
    names = {int(b): name for name, b in SDPBackend.__members__.items()}

    def wrap(original: SdpaFunction) -> SdpaFunction:
        def counted(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any
        ) -> torch.Tensor:
            try:
                mask = kwargs.get("attn_mask", args[0] if args else None)
                choice = names.get(int(torch._fused_sdp_choice(q, k, v, mask)), "?")
            except (RuntimeError, TypeError):
                choice = "?"
            label = f"{choice} q{list(q.shape)} kv{list(k.shape)[-2:]}"
            counts[label] = counts.get(label, 0) + 1
            return original(q, k, v, *args, **kwargs)

        return counted

    with _sdpa_wrapped(wrap):
        yield counts


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


def _graphed(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """``fn`` replayed as one CUDA graph, as accel's runtime replays a compiled stage."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


#: kernel kinds, the first whose name fragments a kernel's name contains (lower case) wins
KINDS = (
    ("attention", ("fmha", "flash", "sdpa", "attention", "attn")),
    ("convolution", ("conv", "fprop", "implicit_convolve", "winograd")),
    (
        "matrix product",
        ("gemm", "nvjet", "cutlass", "cublas", "triton_tem", "_mm_", "sm90_xmma", "sm80_xmma"),
    ),
    ("triton generated", ("triton",)),
)


def kind_of(kernel: str) -> str:
    """The kind of GPU kernel ``kernel`` names (see :data:`KINDS`), else ``"other"``."""
    name = kernel.lower()
    return next((kind for kind, parts in KINDS if any(p in name for p in parts)), "other")


#: FLOP-counted ATen operators by kernel kind. Attention is counted from the shapes of each SDPA call
#: (whichever kernel runs it; the counter misses some, such as the CPU's), so a ``bmm`` is a matrix product.
FLOP_KINDS = (
    ("convolution", ("convolution",)),
    ("matrix product", ("mm", "addmm", "bmm", "baddbmm", "linear")),
)


def flop_kind(op: str) -> str:
    """The kernel kind (see :data:`FLOP_KINDS`) of ATen operator ``op`` (``aten.addmm``), else ``"other"``."""
    name = op.rsplit(".", 1)[-1]
    return next((kind for kind, ops in FLOP_KINDS if name in ops), "other")


def counted(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, int]]:
    """``fn()`` and the FLOPs it ran by kernel kind (``torch.utils.flop_counter``: 2 per multiply-add;
    attention ``2 * batch * heads * queries * keys * (head dim + value dim)``, as that counter has it)."""
    from torch.utils.flop_counter import FlopCounterMode

    in_attention: dict[str, int] = {}  # what the counter saw inside SDPA calls, not counted twice
    attention_flops = 0

    def wrap(original: SdpaFunction) -> SdpaFunction:
        def attention(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any
        ) -> torch.Tensor:
            nonlocal attention_flops
            attention_flops += 2 * math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
            before = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
            out = original(q, k, v, *args, **kwargs)
            for op, n in counter.get_flop_counts().get("Global", {}).items():
                in_attention[str(op)] = in_attention.get(str(op), 0) + int(n) - before.get(str(op), 0)
            return out

        return attention

    with FlopCounterMode(display=False) as counter, _sdpa_wrapped(wrap):
        out = fn()
    flops = {"attention": attention_flops}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        kind = flop_kind(str(op))
        flops[kind] = flops.get(kind, 0) + int(n) - in_attention.get(str(op), 0)
    return out, {kind: n for kind, n in flops.items() if n}


def profiled(call: Callable[[], torch.Tensor], device: torch.device, calls: int = 3) -> dict[str, Any]:
    """GPU kernel time of one ``call`` by kind (ms, averaged over ``calls``), its 8 busiest kernels, and
    the call's wall time on the GPU stream (so busy share = kernel time / wall time)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(calls):
            call()
        end.record()
        torch.cuda.synchronize(device)
    kinds: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = event.time_range.elapsed_us() / 1000 / calls
        kinds[kind_of(event.name)] = kinds.get(kind_of(event.name), 0.0) + ms
        kernels[event.name] = kernels.get(event.name, 0.0) + ms
    top = sorted(kernels.items(), key=lambda item: -item[1])[:8]
    return {
        "kernel_ms": sum(kinds.values()),
        "wall_ms": start.elapsed_time(end) / calls,
        "by_kind_ms": dict(sorted(kinds.items(), key=lambda item: -item[1])),
        "top_kernels_ms": [[name[:120], ms] for name, ms in top],
    }


def measure(
    model: torch.nn.Module, option: str, batch: int, args: argparse.Namespace, ref: torch.Tensor
) -> dict:
    """One option at one batch: ms per call, compile seconds, and the output against eager."""
    device = next(model.parameters()).device
    torch._dynamo.reset()
    graphs = device.type == "cuda" and not args.no_graphs
    with _applied(option, model), torch.no_grad():
        call_args, call_kwargs = _inputs(model, batch, args.size, option)
        target: Callable[..., Any] = model
        if "eager" not in atoms(option):
            target = torch.compile(model, dynamic=False, options=inductor_options(option) or None)

        def call() -> torch.Tensor:
            return _output(target, call_args, call_kwargs)

        began, before = time.perf_counter(), CompilerWork.now()
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compile_s = time.perf_counter() - began
        work = CompilerWork.now().since(before)
        timed = _graphed(call, device) if graphs else call
        times = _timed(timed, args.warmup, args.repeat, device)
        out = timed().clone()
        profile: dict[str, Any] | None = None
        if args.profile and device.type == "cuda":
            try:
                profile = profiled(call, device)
            except Exception as error:  # the timing row stands without its profile
                profile = {"error": repr(error)[:300]}
    diff = (out.float() - ref.float()).contiguous()
    return {
        "option": option,
        "batch": batch,
        "cuda_graph": graphs,
        "ms": statistics.median(times),
        "ms_min": min(times),
        "first_call_s": compile_s,
        "compiler_work": dataclasses.asdict(work),
        "max_abs_diff": float(diff.abs().max()),
        "rel_l2": float(diff.norm() / ref.float().norm().clamp_min(1e-30)),
        **({"profile": profile} if profile else {}),
    }


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"{result['model']} {result['size']}², {'VAE decoder' if result.get('component') == 'vae' else 'whole denoiser'} "
        f"per call{' (CUDA graph replay)' if result['rows'] and result['rows'][0].get('cuda_graph') else ''}, "
        f"{'FLOPs counted on the meta device' if result.get('device') == 'meta' else env.get('gpu') or 'CPU'}, torch "
        f"{result['versions'].get('torch')}, diffusers {result['versions'].get('diffusers')}, {result['date']}.",
    ]
    if result["rows"]:
        lines += [
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
    for batch, choices in result.get("sdpa_default", {}).items():
        picked = "; ".join(f"{label} x{n}" for label, n in choices.items()) or "no SDPA call"
        lines.append(f"\nbatch {batch}: SDPA backend torch picks by default: {picked}")
    profiled_rows = [row for row in result["rows"] if row.get("profile") and "error" not in row["profile"]]
    if profiled_rows:
        kinds = list(dict.fromkeys(k for row in profiled_rows for k in row["profile"]["by_kind_ms"]))
        lines += [
            "",
            "GPU kernel time per call by kind, ms (profiler, kernels launched one by one; busy = kernel time "
            "/ time on the stream):",
            "",
            "| batch | option | " + " | ".join(kinds) + " | all kernels | busy |",
            "|---:|---|" + "---:|" * (len(kinds) + 2),
        ]
        for row in profiled_rows:
            prof = row["profile"]
            cells = " | ".join(f"{prof['by_kind_ms'].get(k, 0.0):.2f}" for k in kinds)
            busy = prof["kernel_ms"] / prof["wall_ms"] if prof["wall_ms"] else float("nan")
            lines.append(
                f"| {row['batch']} | {row['option']} | {cells} | {prof['kernel_ms']:.2f} | {busy:.0%} |"
            )
    for batch, flops in result.get("flops", {}).items():
        kinds = sorted(flops, key=flops.get, reverse=True)
        lines += [
            "",
            f"batch {batch}: TFLOP per eager call, {sum(flops.values()) / 1e12:.3f} in all (torch.utils.flop_counter)"
            + (", and the TFLOP/s each profiled option's kernels reach" if profiled_rows else "")
            + ":",
            "",
            "| option | " + " | ".join(kinds) + " |",
            "|---|" + "---:|" * len(kinds),
            "| TFLOP | " + " | ".join(f"{flops[k] / 1e12:.3f}" for k in kinds) + " |",
        ]
        for row in profiled_rows:
            if str(row["batch"]) != batch:
                continue
            ms = row["profile"]["by_kind_ms"]
            cells = (f"{flops[k] / 1e9 / ms[k]:.0f}" if ms.get(k) else "-" for k in kinds)
            lines.append(f"| {row['option']}, TFLOP/s | " + " | ".join(cells) + " |")
    for failed in result.get("failed", []):
        lines.append(f"\nbatch {failed['batch']} {failed['option']}: failed ({failed['error']})")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = _arguments()
    options = [o for o in args.options.split(",") if o]
    for option in options:
        atoms(option)
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
        "device": str(args.device),
        "environment": environment(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": [],
    }

    def save() -> None:  # after every row: a call cut short keeps what it measured
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.output.with_suffix(".md").write_text(markdown(result))

    for batch in args.batch or [2]:
        with torch.no_grad(), _sdpa_choices() as choices:
            call_args, call_kwargs = _inputs(model, batch, args.size, "eager")
            ref, flops = counted(functools.partial(_output, model, call_args, call_kwargs))
        result.setdefault("flops", {})[str(batch)] = flops
        if ref.device.type == "meta":
            save()
            continue  # FLOPs only: nothing runs (or picks an attention kernel) on the meta device
        result.setdefault("sdpa_default", {})[str(batch)] = choices
        save()
        for option in options:
            try:
                row = measure(model, option, batch, args, ref)
            except Exception as error:  # an option this GPU or torch cannot run: recorded, the rest go on
                result.setdefault("failed", []).append(
                    {"option": option, "batch": batch, "error": repr(error)[:500]}
                )
                print(f"batch {batch} {option}: failed: {error!r}"[:800], flush=True)
                continue
            result["rows"].append(row)
            print(
                f"batch {batch} {option}: {row['ms']:.2f} ms/call (first call {row['first_call_s']:.1f} s)",
                flush=True,
            )
            save()
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
