"""Per backend: cold export, warm load and per-step time of every stage of a plan, next to eager.

Run ``--phase export`` once (a cold inductor cache: set ``TORCHINDUCTOR_CACHE_DIR`` to an empty folder),
then ``--phase load`` in a new process (another empty cache folder, so that only the engine files can
help). Each phase writes its own JSON; ``load`` times every stage callable (the whole denoiser of the CFG
phase, and each window segment) as the runtime runs it: loaded from the engine directory and replayed as
a CUDA graph, next to the same stage run eagerly, with CUDA events over ``--iters`` calls after warm-up.

    python -m accel plan --arch sdxl-base-1.0 --devices 2 --device cuda -o engines/sdxl.plan.json
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/backends_gpu.py --plan engines/sdxl.plan.json \\
        --backend aot --engines engines/aot --phase export -o aot-export.json
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/backends_gpu.py --plan engines/sdxl.plan.json \\
        --backend aot --engines engines/aot --phase load -o aot-load.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from accel.compile.backends import get_backend
from accel.compile.engines import stage_jobs
from accel.compile.runner import GRAPH_BACKENDS, CUDAGraphCallable
from accel.compile.store import EngineError, EngineStore
from accel.plan import load_plan
from accel.settings import PRECISIONS
from accel.source import ModelSource
from accel.targets import load_denoiser


def _step_ms(fn: Any, inputs: tuple[torch.Tensor, ...], iters: int) -> list[float]:
    with torch.no_grad():
        for _ in range(3):
            fn(*inputs)
        times = []
        for _ in range(iters):
            if inputs[0].device.type != "cuda":  # a CPU dry run of the script
                t0 = time.perf_counter()
                fn(*inputs)
                times.append((time.perf_counter() - t0) * 1000)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return times


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--phase", choices=["export", "load"], required=True)
    parser.add_argument("--keys", default="", help="comma-separated key prefixes to include (default: all)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("backends")

    plan = load_plan(args.plan)
    backend = get_backend(args.backend)
    reason = backend.available()
    result: dict[str, Any] = {
        "backend": args.backend,
        "phase": args.phase,
        "plan": str(args.plan),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "backend_version": None if reason else backend.version(),
        "date": time.strftime("%Y-%m-%d"),
        "stages": {},
    }
    if reason is not None:
        result["unavailable"] = reason
        args.output.write_text(json.dumps(result, indent=2))
        log.info("backend %s unavailable: %s", args.backend, reason)
        return
    denoiser, _ = load_denoiser(
        ModelSource.from_dict(plan.source), dtype=PRECISIONS[plan.dtype], device=args.device
    )
    prefixes = tuple(p for p in args.keys.split(",") if p)
    store = EngineStore(args.engines)
    for job in stage_jobs(plan, denoiser):
        if prefixes and not job.key.startswith(prefixes):
            continue
        entry: dict[str, Any] = {"phase": job.phase}
        if args.phase == "export":
            start = time.perf_counter()
            with torch.no_grad():
                record = store.export(job.key, backend, job.module, job.example_inputs, rebuild=True)
            entry["export_s"] = time.perf_counter() - start
            entry["file_mb"] = record.size / 1e6
        else:
            with torch.no_grad():
                eager = _step_ms(job.module, job.example_inputs, args.iters)
            _sync()
            start = time.perf_counter()
            try:
                fn: Any = store.load(job.key, backend, job.module, job.example_inputs)
            except EngineError as exc:  # e.g. the export phase ran out of time before this stage
                result["stages"][job.key] = {"phase": job.phase, "error": str(exc)}
                continue
            if args.backend in GRAPH_BACKENDS and job.example_inputs[0].device.type == "cuda":
                fn = CUDAGraphCallable(fn, job.key)
            with torch.no_grad():
                out = fn(*job.example_inputs)  # first call: lazy compilation from the cache, graph capture
                expected = job.module(*job.example_inputs)
            _sync()
            entry["load_s"] = time.perf_counter() - start
            entry["max_abs_diff_vs_eager"] = max(
                float((a.float() - b.float()).abs().max()) for a, b in zip(out, expected, strict=True)
            )
            compiled = _step_ms(fn, job.example_inputs, args.iters)
            entry["eager_ms"] = statistics.median(eager)
            entry["compiled_ms"] = statistics.median(compiled)
            entry["speedup"] = entry["eager_ms"] / entry["compiled_ms"]
        log.info("%s %s: %s", args.backend, job.key, entry)
        result["stages"][job.key] = entry
        args.output.write_text(json.dumps(result, indent=2))  # partial results survive a time-out
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
