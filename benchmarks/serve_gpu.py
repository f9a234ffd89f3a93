"""`accel serve` against the same pipeline called in-process, on one machine, side by side.

    python benchmarks/serve_gpu.py sdxl-1024.plan.json --engines engines/ --steps 50 --size 1024x1024 \
        --max-batch 1 --max-batch 4 --clients 1 --clients 4 --clients 8 -o docs/benchmarks/serve/h200-sdxl

First ``accel run TARGET --json`` (the wrapped pipeline called in one process, one image per call, after a
warm-up call) gives the in-process seconds per call; then, for each ``--max-batch``, a server is started
with the same target, engines and settings, and ``benchmarks/serve_load.py``'s clients send requests at each
concurrency (``--requests-per-client`` each). Writes OUT/result.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import serve_load  # benchmarks/serve_load.py, beside this script

PROMPT = "a photo of an astronaut riding a horse"


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("target", help="What `accel run` and `accel serve` take: a plan, a model folder, ...")
    p.add_argument("--engines", type=Path, help="An engine directory for both.")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", default="1024x1024", help="WxH")
    p.add_argument("--precision", default="fp16")
    p.add_argument("--max-batch", type=int, action="append", help="Repeat for several servers (default 1).")
    p.add_argument("--clients", type=int, action="append", help="Repeat for several concurrencies.")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument(
        "--output-format",
        action="append",
        help="png, jpeg or webp; repeat to load each server once per format (default png).",
    )
    p.add_argument("--calls", type=int, default=5, help="Timed in-process calls (after one warm-up call).")
    p.add_argument("-o", "--output", type=Path, required=True)
    return p.parse_args()


def _shared(args: argparse.Namespace) -> list[str]:
    shared = [args.target, "--devices", "1", "--steps", str(args.steps), "--precision", args.precision]
    if args.engines is not None:
        shared += ["--engines", str(args.engines)]
    return shared


def in_process(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per wrapped pipeline call in one `accel run` process (one image per call, warm)."""
    width, height = args.size.split("x")
    cmd = [sys.executable, "-m", "accel", "run", *_shared(args), "--height", height, "--width", width]
    cmd += ["--batch-size", "1", "--warmup", "1", "-o", str(args.output / "in-process.png"), "--json"]
    for _ in range(args.calls):
        cmd += ["-p", PROMPT]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, check=True)
    out = proc.stdout.decode()
    summary = json.loads(out[out.index("{") :])
    seconds = [call["seconds"] for call in summary["calls"]]
    return {"command": cmd[1:], "call_seconds": seconds, "median_s": statistics.median(seconds)}


def served(args: argparse.Namespace, max_batch: int) -> list[dict[str, Any]]:
    """One server with ``--max-batch max_batch``; a load report per concurrency."""
    serve_args = " ".join([*_shared(args), "--size", args.size, "--max-batch", str(max_batch)])
    started = time.perf_counter()
    server, url = serve_load._start_server(serve_args)
    ready_s = time.perf_counter() - started
    reports = []
    try:
        for clients, output_format in [
            (c, f) for c in args.clients or [1] for f in args.output_format or ["png"]
        ]:
            load = SimpleNamespace(
                clients=clients,
                requests=clients * args.requests_per_client,
                size=[args.size],
                steps=[args.steps],
                n=1,
                prompt=PROMPT,
                seed=0,
                timeout=600.0,
                output_format=output_format,
                label=f"max-batch {max_batch}, {clients} client(s), {output_format}",
            )
            report = serve_load._run(load, url)
            report.update(max_batch=max_batch, server_ready_s=ready_s, output_format=output_format)
            reports.append(report)
            print(serve_load._table(report), flush=True)
    finally:
        server.send_signal(serve_load.signal.SIGTERM)
        server.wait(120)
    return reports


def markdown(result: dict[str, Any]) -> str:
    ref = result["in_process"]["median_s"]
    env, ver = result["environment"], result["versions"]
    lines = [
        f"{env.get('gpus', 0)} x {env.get('gpu', 'CPU')}, torch {ver.get('torch')}, diffusers "
        f"{ver.get('diffusers')}, {result['date']}.",
        "",
        f"In-process wrapped call (median of {len(result['in_process']['call_seconds'])}): {ref:.3f} s.",
        "",
        "| max-batch | clients | format | requests | images/s | p50 total s | p95 total s | p50 / in-process | "
        "p50 loop s | p50 decode s | p50 encode s | images per call |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["served"]:
        lat = r["latency_s"]
        lines.append(
            f"| {r['max_batch']} | {r['clients']} | {r.get('output_format', 'png')} | {r['ok']}/{r['requests']} | "
            f"{r['images_per_s']:.3f} | "
            f"{lat['total']['p50']:.3f} | {lat['total']['p95']:.3f} | {lat['total']['p50'] / ref:.3f} | "
            f"{lat['loop']['p50']:.3f} | {lat['decode']['p50']:.3f} | {lat['encode']['p50']:.3f} | "
            f"{r['batch_images']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = _arguments()
    args.output.mkdir(parents=True, exist_ok=True)
    from accel.bench.speed import environment, versions

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "environment": environment(),
        "versions": versions(),
        "in_process": in_process(args),
        "served": [],
    }
    for max_batch in args.max_batch or [1]:
        result["served"] += served(args, max_batch)
        (args.output / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output / "summary.md").write_text(markdown(result))
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
