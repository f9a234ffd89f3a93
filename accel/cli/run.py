"""``accel run``: launch the worker processes and generate images, or run a script in every worker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from accel.cli import options
from accel.cli.common import fail, set_verbosity
from accel.compile.loader_check import start_background_check
from accel.compile.work import CompilerWork
from accel.errors import AccelError
from accel.launch import LaunchError, launch_function, launch_script
from accel.request import DEFAULT_PROMPT, GenerationRequest, RequestError

HELP = """Generate images on several devices, launching one worker process per device.

TARGET is a plan file (plan.json, from `accel plan`; its source names the model), a diffusers
pipeline folder (or hub id), or a Python script. Use --demo sdxl|sd3 for the built-in tiny pipelines.
A script runs in every worker with RANK, WORLD_SIZE, MASTER_ADDR, ... set, so `accel.wrap(pipe,
devices=2)` inside it joins the group; arguments after `--` go to the script.

\b
  accel run --demo sdxl --devices 2 --accelerator cpu -p "a cat" -o cat.png
  accel run sdxl-1024.plan.json --engines engines/ --prompts-file prompts.txt -o out/
  accel run ./sdxl-folder --devices 2 --precision fp16 --strategy hybrid -p "a fox" -o fox.png
  accel run examples/sdxl_torchrun.py --devices 2 -- /models/sdxl
  accel run --demo sdxl --devices 1 --num-nodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500
"""


def _launch_failed(console: Console, message: str, exc: Any, as_json: bool) -> NoReturn:
    """A worker failed: say which and why (also as JSON on stdout with ``--json``), exit 1."""
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": str(exc), "failures": exc.failures}, indent=2))
    fail(console, message, code=1)


def run(
    ctx: typer.Context,
    target: str = typer.Argument(
        None, help="A plan file, a diffusers model folder or hub id, or a script.py.", show_default=False
    ),
    demo: str = options.DEMO,
    prompt: list[str] = typer.Option(
        None, "--prompt", "-p", help=f"A prompt; repeat for several (default: {DEFAULT_PROMPT!r})."
    ),
    prompts_file: Path = typer.Option(
        None, "--prompts-file", "--prompt-file", help="A text file with one prompt per line."
    ),
    negative_prompt: str = typer.Option(None, "--negative-prompt", help="Used for every prompt."),
    batch_size: int = typer.Option(
        None,
        "--batch-size",
        min=1,
        help="Prompts per pipeline call (default 4; with a plan, the plan's batch).",
    ),
    steps: int = typer.Option(None, "--steps", min=1, help="Denoising steps (default: 20)."),
    guidance: float = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: 5.0)."),
    height: int = typer.Option(
        None, "--height", min=8, help="Image height (default: the plan's or model's)."
    ),
    width: int = typer.Option(None, "--width", min=8, help="Image width (default: the plan's or model's)."),
    seed: int = typer.Option(None, "--seed", help="Image i uses seed SEED+i (default: 0)."),
    devices: int = options.DEVICES,
    num_nodes: int = options.NUM_NODES,
    node_rank: int = options.NODE_RANK,
    master_addr: str = options.MASTER_ADDR,
    master_port: int = options.MASTER_PORT,
    accelerator: str = options.ACCELERATOR,
    precision: str = options.PRECISION,
    strategy: str = options.STRATEGY,
    window_guidance: str = options.WINDOW_GUIDANCE,
    schedule: str = options.SCHEDULE,
    backend: str = options.BACKEND,
    engines: Path = options.ENGINES,
    strict: bool = options.STRICT,
    compile_missing: bool = options.COMPILE_MISSING,
    timeout: float = typer.Option(
        300.0, "--timeout", min=1.0, help="Seconds any collective (and joining the group) may wait."
    ),
    warmup: int = typer.Option(
        None, "--warmup", min=0, help="Untimed calls before the first batch (default: 0)."
    ),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="An image file (out.png; several: out-0.png, ...) or a folder (default: accel-out.png).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the result as JSON on stdout (no progress bar)."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Log the launcher's and the workers' steps (accel's INFO logs)."
    ),
) -> None:
    entered = time.time()  # start-up milestones for `--json` (accel bench --startup splits its time)
    # The engines' loader check runs beside this process's own imports (torch, diffusers).
    checking = start_background_check(engines)  # noqa: F841  (held while it runs)
    # Deferred: these import torch and diffusers, which `accel --help` must not wait for.
    from accel.jobs import Layout, generation_job, script_layout
    from accel.targets import resolve_target

    console = Console(stderr=True, soft_wrap=True)
    set_verbosity(console, verbose)
    request = GenerationRequest(
        prompt, prompts_file, negative_prompt, batch_size, steps, guidance, height, width, seed, precision,
        strategy, window_guidance, schedule, backend, engines, strict, compile_missing, warmup, output
    )  # fmt: skip
    layout = Layout(devices, num_nodes, node_rank, master_addr, master_port, accelerator, timeout)
    try:
        if ctx.args and not (target or "").endswith(".py"):
            raise RequestError(
                f"unexpected arguments {' '.join(ctx.args)}: only a script.py target takes arguments."
            )
        tgt = resolve_target(target, demo)
        if tgt.script is not None:
            given = request.given()
            if given:
                raise RequestError(
                    f"{', '.join(given)} configure generation by accel; a script reads its own arguments: "
                    f"pass them after `--` (accel run {target} --devices N -- ARGS)."
                )
            _run_script(console, tgt.script, script_layout(layout).launch_spec(), list(ctx.args), as_json)
            return
        job, spec = generation_job(
            tgt, request, layout, progress=not as_json, log_level="INFO" if verbose else "WARNING"
        )
    except AccelError as exc:
        fail(console, str(exc))
    _run_generation(console, tgt.label, job, spec, as_json, {"cli": entered, "prepared": time.time()})


def _run_script(console: Console, script: Path, spec: Any, args: list[str], as_json: bool) -> None:
    try:
        launch_script(spec, script, args)
    except LaunchError as exc:
        _launch_failed(console, f"{script}: {exc}", exc, as_json)
    if as_json:
        typer.echo(json.dumps({"ok": True, "script": str(script), "world_size": spec.world_size}))


def _run_generation(
    console: Console, label: str, job: Any, spec: Any, as_json: bool, stamps: dict[str, float]
) -> None:
    """Launch the workers; ``stamps`` are this process's start-up milestones (``cli``: the command
    entered; ``prepared``: the target loaded and checked), reported with the workers' own."""
    from accel.generation import generate  # deferred: imports torch and diffusers

    if not as_json:
        console.print(
            f"accel run: {label}, {len(job.prompts)} prompt(s), {spec.devices} process(es) x "
            f"{spec.num_nodes} node(s), strategy {job.settings['strategy']}, backend {job.settings['backend']}",
            highlight=False,
        )
    try:
        results = launch_function(spec, generate, job)
    except LaunchError as exc:
        _launch_failed(console, str(exc), exc, as_json)
    summary = _summary(label, job, spec, results)
    summary["startup"] = {**stamps, **summary["startup"]}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_summary(Console(soft_wrap=True), summary)


def _summary(label: str, job: Any, spec: Any, results: dict[int, Any]) -> dict[str, Any]:
    first = results[min(results)]
    return {
        "ok": True,
        "target": label,
        "world_size": spec.world_size,
        "node_rank": spec.node_rank,
        "strategy": job.settings["strategy"],
        "backend": job.settings["backend"],
        "prompts": len(job.prompts),
        "steps": job.steps,
        "seconds": first["seconds"],
        "images": [path for rank in sorted(results) for path in results[rank]["images"]],
        "calls": first["calls"],
        "startup": first.get("startup", {}),
    }


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    calls = summary["calls"]
    table = Table(
        title=f"accel run: {summary['target']}, {summary['world_size']} process(es), {summary['steps']} steps, "
        f"{summary['strategy']}"
    )
    hybrid = summary["strategy"] == "hybrid"
    columns = ["#", "images", "seconds", "ms/step", "collectives", "KiB sent"] + (
        ["window"] if hybrid else []
    )
    for column in columns:
        table.add_column(column, justify="right")
    for i, call in enumerate(calls):
        window = call.get("window")
        row = [
            str(i),
            str(call.get("images", "")),
            f"{call['seconds']:.3f}",
            f"{1000 * call['seconds'] / max(1, summary['steps']):.1f}",
            str(call["collectives"]),
            f"{call['bytes_sent'] / 1024:.1f}",
        ]
        if hybrid:
            row.append(f"steps {window[0]}-{window[1]}" if window else "none")
        table.add_row(*row)
    console.print(table)
    last = calls[-1] if calls else {}
    if any(last.get(k) for k in ("loaded_stages", "compiled_stages", "eager_stages")):
        work = CompilerWork(**(last.get("compiler_work") or {}))
        console.print(
            f"stages: {last.get('loaded_stages', 0)} loaded, {last.get('compiled_stages', 0)} compiled, "
            f"{last.get('eager_stages', 0)} eager; {last.get('stage_seconds', 0.0):.1f} s to load or compile, "
            f"{last.get('stage_first_call_seconds', 0.0):.1f} s in first calls; compiler: {work.describe()}",
            highlight=False,
        )
    for path in summary["images"]:
        console.print(f"wrote {path}", highlight=False)
    if summary["node_rank"] != 0:
        console.print(f"node {summary['node_rank']} done; node 0 writes the images.", highlight=False)
