"""Load test for `accel serve`: N concurrent clients send M image requests; reports throughput, latency
percentiles per phase and errors, as JSON and a plot.

    # against a running server (any machine that can reach it)
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 8 --requests 200 -o out/
    # start a local server for the run, then drain it (SIGTERM) at the end
    python benchmarks/serve_load.py --serve "--demo sdxl --devices 2 --accelerator cpu --steps 4" -o out/

Sizes and steps are fixed (one value each) or mixed (several values: each request draws one, from a
seeded generator, so two runs send the same sequence). Latency phases: ``total`` is measured by the
client (send to last byte); ``queue``, ``loop`` (denoising), ``decode`` (VAE and post-processing) and
``encode`` (PNG) are the server's own timings of each request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PHASES = ("total", "queue", "loop", "decode", "encode")
PERCENTILES = (50, 95, 99)


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="A running server, e.g. http://127.0.0.1:8000.")
    target.add_argument(
        "--serve", help="Start `accel serve` with these arguments for the run (then drain it)."
    )
    p.add_argument("--clients", type=int, default=8, help="Concurrent clients (default 8).")
    p.add_argument("--requests", type=int, default=200, help="Requests in all (default 200).")
    p.add_argument("--size", action="append", help="WxH; repeat to mix (default: the server's first size).")
    p.add_argument("--steps", type=int, action="append", help="Steps; repeat to mix (default: the server's).")
    p.add_argument("--n", type=int, default=1, help="Images per request (default 1).")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    p.add_argument(
        "--output-format", default="png", help="png (default), jpeg or webp: the images' file format."
    )
    p.add_argument("--seed", type=int, default=0, help="Seeds the request mix and the image seeds.")
    p.add_argument("--timeout", type=float, default=600.0, help="Seconds one request may take.")
    p.add_argument("--label", default="", help="A name for this run in the report.")
    p.add_argument("--output", "-o", type=Path, default=Path("serve-load"), help="Folder for JSON and plot.")
    return p.parse_args()


def _start_server(arguments: str) -> tuple[subprocess.Popen[bytes], str]:
    sock_port = _free_port()
    command = [sys.executable, "-m", "accel", "serve", *shlex.split(arguments), "--port", str(sock_port)]
    server = subprocess.Popen(command, start_new_session=True)
    url = f"http://127.0.0.1:{sock_port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"accel serve exited with {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("accel serve was not ready after 900 s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in PERCENTILES}
    return {f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES}


def _run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    sizes = args.size or [model["sizes"][0]]
    steps = args.steps or [model["default_steps"]]
    draw = random.Random(args.seed)
    bodies = [
        {
            "prompt": f"{args.prompt} ({i})",
            "n": args.n,
            "size": draw.choice(sizes),
            "num_inference_steps": draw.choice(steps),
            "seed": args.seed + i * args.n,
            **({"output_format": args.output_format} if args.output_format != "png" else {}),
        }
        for i in range(args.requests)
    ]
    results: list[dict[str, Any]] = [{} for _ in bodies]
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))
    started = time.perf_counter()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=args.timeout) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                sent = time.perf_counter()
                try:
                    response = http.post("/v1/images/generations", json=bodies[i])
                    status = response.status_code
                    body = response.json() if status == 200 else {"error": response.text[:300]}
                except httpx.HTTPError as exc:
                    status, body = 0, {"error": f"{type(exc).__name__}: {exc}"}
                done = time.perf_counter()
                results[i] = {
                    "status": status,
                    "sent": sent - started,
                    "total": done - sent,
                    "size": bodies[i]["size"],
                    "steps": bodies[i]["num_inference_steps"],
                    **(
                        {"timings": body["timings"], "batch_images": body["batch_images"]}
                        if status == 200
                        else {}
                    ),
                    **({"error": body["error"]} if status != 200 else {}),
                }

    with ThreadPoolExecutor(args.clients) as pool:
        for _ in range(args.clients):
            pool.submit(client)
    wall = time.perf_counter() - started
    ok = [r for r in results if r.get("status") == 200]
    phases = {"total": _percentiles([r["total"] for r in ok])}
    for phase in PHASES[1:]:
        phases[phase] = _percentiles([r["timings"][phase] for r in ok if phase in r["timings"]])
    errors = Counter(str(r.get("status")) for r in results if r.get("status") != 200)
    return {
        "label": args.label,
        "url": url,
        "model": model["id"],
        "clients": args.clients,
        "requests": args.requests,
        "images_per_request": args.n,
        "sizes": sizes,
        "steps": steps,
        "wall_s": wall,
        "ok": len(ok),
        "errors": dict(errors),
        "images_per_s": len(ok) * args.n / wall,
        "requests_per_s": len(ok) / wall,
        "latency_s": phases,
        "batch_images": dict(sorted(Counter(r["batch_images"] for r in ok).items())),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "results": results,
    }


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['ok']}/{report['requests']} ok, {report['clients']} clients, sizes {', '.join(report['sizes'])}, "
        f"steps {', '.join(map(str, report['steps']))}: {report['images_per_s']:.2f} images/s, "
        f"{report['requests_per_s']:.2f} requests/s, errors {report['errors'] or 'none'}, "
        f"images per call {report['batch_images']}",
        "",
        "| phase | p50 ms | p95 ms | p99 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for phase, values in report["latency_s"].items():
        cells = [f"{1000 * values[f'p{q}']:.0f}" if values[f"p{q}"] is not None else "-" for q in PERCENTILES]
        lines.append(f"| {phase} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(11, 4))
    phases = list(report["latency_s"])
    width = 0.25
    for k, q in enumerate(PERCENTILES):
        values = [1000 * (report["latency_s"][p][f"p{q}"] or 0) for p in phases]
        bars.bar([i + (k - 1) * width for i in range(len(phases))], values, width, label=f"p{q}")
    bars.set_xticks(range(len(phases)), phases)
    bars.set_ylabel("ms")
    bars.set_title("latency per phase")
    bars.legend()
    ok = [r for r in report["results"] if r.get("status") == 200]
    scatter.scatter([r["sent"] for r in ok], [1000 * r["total"] for r in ok], s=8, label="200")
    failed = [r for r in report["results"] if r.get("status") not in (None, 200)]
    if failed:
        scatter.scatter(
            [r["sent"] for r in failed], [1000 * r["total"] for r in failed], s=12, c="red", label="error"
        )
    scatter.set_xlabel("sent at (s)")
    scatter.set_ylabel("total latency (ms)")
    scatter.set_title(f"{report['images_per_s']:.2f} images/s, {report['clients']} clients")
    scatter.legend()
    fig.suptitle(f"accel serve load: {report['label'] or report['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = _arguments()
    server = None
    url = args.url
    if args.serve is not None:
        server, url = _start_server(args.serve)
    try:
        report = _run(args, url.rstrip("/"))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / "summary.md").write_text(_table(report) + "\n")
    _plot(report, args.output / "latency.png")
    print(_table(report))
    print(f"wrote {args.output / 'result.json'}, {args.output / 'summary.md'}, {args.output / 'latency.png'}")
    if report["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
