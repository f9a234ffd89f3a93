"""``accel run``: launch the worker processes and generate images, or run a script in every worker."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from accel.cli.app import app
from accel.cli.generate import IMAGE_SUFFIXES, GenerationJob

DEFAULT_PROMPT = "a photo of an astronaut riding a horse"

_HELP = """Generate images on several devices, launching one worker process per device.

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


class RunInputError(ValueError):
    """The command line asks for something that cannot run; the message says what to change."""


@dataclass(frozen=True)
class Target:
    """What ``accel run`` was asked to run."""

    kind: str  # "script", "plan" or "model"
    script: Path | None = None
    source: dict[str, Any] | None = None
    plan: Any = None
    plan_path: Path | None = None

    @property
    def label(self) -> str:
        if self.script is not None:
            return str(self.script)
        if self.plan_path is not None:
            return str(self.plan_path)
        assert self.source is not None
        return str(self.source.get("name") or self.source.get("path") or self.source.get("id"))


def _fail(console: Console, message: str, code: int = 2) -> NoReturn:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _log_to(console: Console) -> None:
    """Send accel's and the elastic launcher's records to the console (the CLI owns this process)."""
    import logging

    from rich.logging import RichHandler

    logging.getLogger("accel").setLevel(logging.INFO)
    logging.getLogger("accel.launch").setLevel(logging.DEBUG)  # includes the elastic launcher's records
    logging.getLogger("accel").addHandler(RichHandler(console=console, show_path=False))


def _launch_failed(console: Console, message: str, exc: Any, as_json: bool) -> NoReturn:
    """A worker failed: say which and why (also as JSON on stdout with ``--json``), exit 1."""
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": str(exc), "failures": exc.failures}, indent=2))
    _fail(console, message, code=1)


def resolve_target(target: str | None, demo: str | None) -> Target:
    """Classify TARGET / --demo; :class:`RunInputError` when it is missing, ambiguous or unusable."""
    from accel.cli.plan import DEMOS, model_source

    if (target is None) == (demo is None):
        raise RunInputError(
            "give either a TARGET (a plan file, a diffusers model folder or a script.py) or --demo sdxl|sd3, "
            "not both and not neither."
        )
    if demo is not None:
        if demo not in DEMOS:
            raise RunInputError(f"--demo {demo!r} is not one of {', '.join(DEMOS)}.")
        return Target("model", source={"kind": "demo", "name": demo})
    assert target is not None
    path = Path(target)
    if path.suffix == ".py":
        if not path.is_file():
            raise RunInputError(f"{target}: no such script.")
        return Target("script", script=path)
    if path.suffix == ".json":
        return _plan_target(path)
    try:
        return Target("model", source=model_source(target, None, None))
    except typer.BadParameter as exc:
        raise RunInputError(str(exc.message)) from None


def _plan_target(path: Path) -> Target:
    from accel.plan import PlanError, load_plan

    try:
        plan = load_plan(path)
    except PlanError as exc:
        raise RunInputError(str(exc)) from None
    source = plan.source
    if source.get("kind") == "folder":
        folder = Path(str(source.get("path", "")))
        if not (folder / "model_index.json").is_file():
            raise RunInputError(
                f"the plan {path} was made for the model folder {folder}, which is not there (no "
                "model_index.json). Move the model back, or make a new plan with `accel plan MODEL_FOLDER ...`."
            )
    return Target("plan", source=source, plan=plan, plan_path=path)


def _check_output(output: Path) -> None:
    suffix = output.suffix.lower()
    if suffix and suffix not in IMAGE_SUFFIXES:
        raise RunInputError(
            f"--output {output}: images are written as {', '.join(IMAGE_SUFFIXES)}; name a file with one of "
            "those suffixes, or a folder (no suffix)."
        )
    if not suffix and output.exists() and not output.is_dir():
        raise RunInputError(f"--output {output} is a file; name a folder or an image file.")
    # The nearest existing folder must be writable, or the run would fail after generating everything.
    existing = output if not suffix else output.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise RunInputError(f"--output {output}: cannot write under {existing}.")


def _read_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[str]:
    if prompts_file is not None:
        if prompts is not None:
            raise RunInputError("give prompts with --prompt or with --prompts-file, not both.")
        if not prompts_file.is_file():
            raise RunInputError(f"--prompts-file {prompts_file}: no such file.")
        lines = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines()]
        found = [line for line in lines if line]
        if not found:
            raise RunInputError(f"--prompts-file {prompts_file} holds no prompts (one per line).")
        return found
    return list(prompts) if prompts else [DEFAULT_PROMPT]


def _parse_schedule(schedule: str | None) -> Any:
    if schedule is None or schedule in ("adaptive", "always", "never"):
        return schedule
    start, sep, end = schedule.partition("-")
    if sep and start.isdigit() and end.isdigit():
        return (int(start), int(end))
    raise RunInputError(
        f"--schedule {schedule!r}: use adaptive, always, never, or a window START-END of 0-based steps (5-20)."
    )


def _engines_backend(engines: Path, backend: str | None) -> str:
    """The backend to load ``engines`` with: the one given, else the one the manifest records."""
    from accel.compile.store import MANIFEST, EngineError, EngineStore

    if not (engines / MANIFEST).is_file():
        raise RunInputError(
            f"--engines {engines} is not an engine directory (no {MANIFEST}). Write one with "
            f"`accel export PLAN -o {engines}`."
        )
    try:
        records = EngineStore(engines).records()
    except EngineError as exc:
        raise RunInputError(str(exc)) from None
    built = sorted({r.backend for r in records.values()})
    if not built:
        raise RunInputError(
            f"--engines {engines} holds no engines yet; run `accel export PLAN -o {engines}`."
        )
    if backend is None:
        if len(built) > 1:
            raise RunInputError(
                f"--engines {engines} holds engines of several backends ({', '.join(built)}); pick one with "
                "--backend."
            )
        return built[0]
    if backend not in built:
        raise RunInputError(
            f"--engines {engines} was exported with backend {', '.join(built)}, not {backend!r}; pass "
            f"--backend {built[0]} or export again with `accel export PLAN --backend {backend} -o {engines}`."
        )
    return backend


def _check_backend(backend: str) -> None:
    from accel.compile.backends import BACKEND_NAMES, get_backend

    if backend not in BACKEND_NAMES:
        raise RunInputError(f"--backend {backend!r} is not one of {', '.join(BACKEND_NAMES)}.")
    reason = get_backend(backend).available()
    if reason is not None:
        raise RunInputError(
            f"backend {backend!r} cannot run here: {reason} (`accel doctor` lists the usable backends)."
        )


@app.command("run", help=_HELP, context_settings={"allow_extra_args": True})
def run(
    ctx: typer.Context,
    target: str = typer.Argument(
        None, help="A plan file, a diffusers model folder or hub id, or a script.py.", show_default=False
    ),
    demo: str = typer.Option(
        None, "--demo", help="A built-in tiny pipeline (no download, CPU): sdxl or sd3."
    ),
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
    devices: int = typer.Option(
        None,
        "--devices",
        min=1,
        help="Processes (one device each) on this node (default: the plan's, else 2).",
    ),
    num_nodes: int = typer.Option(1, "--num-nodes", min=1, help="Nodes taking part (same command on each)."),
    node_rank: int = typer.Option(
        0, "--node-rank", min=0, help="This node's index; node 0 hosts the rendezvous."
    ),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="Address of node 0."),
    master_port: int = typer.Option(
        None, "--master-port", min=1, max=65535, help="Free port on node 0 (required with --num-nodes > 1)."
    ),
    accelerator: str = typer.Option("auto", "--accelerator", help="auto, cpu (gloo) or cuda (NCCL)."),
    precision: str = typer.Option(
        None, "--precision", help="fp32, fp16 or bf16 (default: the plan's or model's)."
    ),
    strategy: str = typer.Option(
        None, "--strategy", help="cfg or hybrid (default: hybrid with a plan, else cfg)."
    ),
    window_guidance: str = typer.Option(
        None, "--window-guidance", help="Guidance in the pipelined window: reference, cached or off."
    ),
    schedule: str = typer.Option(
        None, "--schedule", help="When to pipeline (hybrid): adaptive, always, never or START-END."
    ),
    backend: str = typer.Option(
        None, "--backend", help="eager, inductor, aot, onnx or tensorrt (default: the engines', else eager)."
    ),
    engines: Path = typer.Option(None, "--engines", help="An engine directory written by `accel export`."),
    strict: bool = typer.Option(
        None, "--strict", help="Fail when a stage cannot compile instead of running it eagerly."
    ),
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
    console = Console(stderr=True, soft_wrap=True)
    if verbose:
        _log_to(console)
    options: dict[str, Any] = dict(
        prompt=prompt,
        prompts_file=prompts_file,
        negative_prompt=negative_prompt,
        batch_size=batch_size,
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        seed=seed,
        precision=precision,
        strategy=strategy,
        window_guidance=window_guidance,
        schedule=schedule,
        backend=backend,
        engines=engines,
        strict=strict,
        warmup=warmup,
        output=output,
    )
    where = _Where(devices, num_nodes, node_rank, master_addr, master_port, accelerator, timeout)
    try:
        if ctx.args and not (target or "").endswith(".py"):
            raise RunInputError(
                f"unexpected arguments {' '.join(ctx.args)}: only a script.py target takes arguments."
            )
        tgt = resolve_target(target, demo)
        if tgt.kind == "script":
            given = sorted(f"--{n.replace('_', '-')}" for n, v in options.items() if v is not None)
            if given:
                raise RunInputError(
                    f"{', '.join(given)} configure generation by accel; a script reads its own arguments: "
                    f"pass them after `--` (accel run {target} --devices N -- ARGS)."
                )
            where = where.with_devices(devices or 2)
            _check_devices(where)
            _run_script(console, tgt, _launch_spec(where), list(ctx.args), as_json)
            return
        job, spec = _generation_job(tgt, options, where, as_json=as_json, verbose=verbose)
    except RunInputError as exc:
        _fail(console, str(exc))
    _run_generation(console, tgt, job, spec, as_json)


@dataclass(frozen=True)
class _Where:
    """Where the workers run: the launch options of the command line."""

    devices: int | None
    num_nodes: int
    node_rank: int
    master_addr: str
    master_port: int | None
    accelerator: str
    timeout: float

    def with_devices(self, devices: int) -> _Where:
        return dataclasses.replace(self, devices=devices)


def _launch_spec(where: _Where) -> Any:
    from accel.launch import LaunchSpec

    assert where.devices is not None
    try:
        return LaunchSpec(
            devices=where.devices,
            num_nodes=where.num_nodes,
            node_rank=where.node_rank,
            master_addr=where.master_addr,
            master_port=where.master_port,
            join_timeout_s=where.timeout,
        )
    except ValueError as exc:
        raise RunInputError(
            str(exc)
            .replace("master_port", "--master-port")
            .replace("node_rank", "--node-rank")
            .replace("num_nodes", "--num-nodes")
            .replace("master_addr", "--master-addr")
        ) from None


def _check_devices(where: _Where, **settings: Any) -> Any:
    """Validate settings and devices here, before any process starts; returns the AccelSettings."""
    import accel

    try:
        acc = accel.Accelerator(
            devices=where.devices, num_nodes=where.num_nodes, accelerator=where.accelerator, **settings
        )
    except (accel.SettingsError, accel.DeviceUnavailableError) as exc:
        message = (
            str(exc)
            .replace("accelerator='cpu'", "--accelerator cpu")
            .replace("Lower devices", "Lower --devices")
        )
        raise RunInputError(message) from None
    return acc.settings


def _plan_worlds(stages: int) -> list[int]:
    """The process counts a plan of ``stages`` stages runs the hybrid window on: one stage per process on 1
    or 2, and on ``2k`` processes each CFG group of ``k`` pipelines its branch over ``k`` stages."""
    if stages == 1:
        return [1]
    return [2, 4] if stages == 2 else [2 * stages]


def worker_settings(tgt: Target, options: dict[str, Any], where: _Where) -> tuple[dict[str, Any], _Where]:
    """The :class:`accel.AccelSettings` keyword arguments every worker makes for a model or plan target,
    checked here against this machine, and ``where`` with its device count decided."""
    o = options
    plan = tgt.plan
    strategy = o["strategy"] or ("hybrid" if plan is not None else "cfg")
    num_nodes, devices = where.num_nodes, where.devices
    if devices is None:
        world = _plan_worlds(plan.devices)[0] if plan is not None else 2
        devices = world // num_nodes if world % num_nodes == 0 else 2
    where = where.with_devices(devices)
    world = devices * num_nodes
    odd = world > 1 and world % 2 == 1  # refused with its own message further on
    if plan is not None and strategy == "hybrid" and not odd and world not in _plan_worlds(plan.devices):
        stages = world if world <= 2 else world // 2
        fits = " or ".join(str(w) for w in _plan_worlds(plan.devices))
        raise RunInputError(
            f"the plan {tgt.plan_path} has {plan.devices} stages, this run has {world} processes "
            f"(--devices {devices} x --num-nodes {num_nodes}), whose hybrid window needs {stages}; run it on "
            f"{fits} processes, or make a plan with `accel plan ... --devices {stages}`."
        )
    backend = o["backend"]
    if o["engines"] is not None:
        backend = _engines_backend(o["engines"], backend)
    backend = backend or (plan.backend if plan is not None else "eager")
    _check_backend(backend)
    settings: dict[str, Any] = dict(
        strategy=strategy,
        precision=o["precision"] or (plan.dtype if plan is not None else None),
        backend=backend,
        collective_timeout_s=where.timeout,
    )
    if o["engines"] is not None:
        settings["engines"] = str(o["engines"].resolve())
    if o["strict"] is not None:
        settings["strict"] = o["strict"]
    if o["window_guidance"] is not None:
        settings["window_guidance"] = o["window_guidance"]
    schedule = _parse_schedule(o["schedule"])
    if schedule is None and plan is not None and plan.schedule:
        schedule = plan.schedule
    if schedule is not None:
        settings["schedule"] = schedule
    if plan is not None and strategy == "hybrid":
        settings["plan"] = str(tgt.plan_path.resolve()) if tgt.plan_path is not None else None
    checked = _check_devices(where, **settings)
    settings.update(devices=checked.devices, num_nodes=checked.num_nodes, accelerator=checked.accelerator)
    return settings, where


def _generation_job(
    tgt: Target, options: dict[str, Any], where: _Where, *, as_json: bool, verbose: bool
) -> tuple[GenerationJob, Any]:
    o = dict(options)
    plan = tgt.plan
    settings, where = worker_settings(tgt, o, where)
    strategy = settings["strategy"]
    spec = _launch_spec(where)
    prompts = _read_prompts(o["prompt"], o["prompts_file"])
    output = o["output"] or Path("accel-out.png")
    _check_output(output)
    height, width = o["height"], o["width"]
    batch_size = o["batch_size"]
    if plan is not None:
        height = height or plan.resolutions[0][0]
        width = width or plan.resolutions[0][1]
        batch_size = batch_size or plan.batches[0]
        if strategy == "hybrid":
            _check_plan_shapes(tgt, height, width, batch_size, len(prompts))
    job = GenerationJob(
        source=dict(tgt.source or {}),
        settings=settings,
        prompts=prompts,
        negative_prompt=o["negative_prompt"],
        batch_size=batch_size or 4,
        steps=o["steps"] or 20,
        guidance=5.0 if o["guidance"] is None else o["guidance"],
        height=height,
        width=width,
        seed=o["seed"] or 0,
        output=str(output),
        warmup=o["warmup"] or 0,
        progress=not as_json,
        log_level="INFO" if verbose else "WARNING",
    )
    return job, spec


def _check_plan_shapes(tgt: Target, height: int, width: int, batch_size: int, prompts: int) -> None:
    """Refuse, before launching, a shape the plan has no bucket for (the window would fail mid-run)."""
    plan = tgt.plan
    problems = []
    if (height, width) not in [tuple(r) for r in plan.resolutions]:
        buckets = ", ".join(f"{h}x{w}" for h, w in plan.resolutions)
        problems.append(f"{height}x{width} is not one of its resolutions ({buckets})")
    last = prompts % batch_size
    for batch in sorted({batch_size, last} - {0}):
        if batch not in plan.batches:
            problems.append(
                f"a call of {batch} prompt(s) is not one of its batch sizes {list(plan.batches)}"
                + (f" ({prompts} prompts in calls of {batch_size})" if batch == last else "")
            )
    if problems:
        raise RunInputError(
            f"the plan {tgt.plan_path} does not fit this run: {'; '.join(problems)}. Use the plan's sizes "
            "(--height/--width/--batch-size), --strategy cfg (no plan needed), or make a plan with "
            f"`accel plan ... --height {height} --width {width} --batch {batch_size}`."
        )


def _run_script(console: Console, tgt: Target, spec: Any, args: list[str], as_json: bool) -> None:
    from accel.launch import LaunchError, launch_script

    assert tgt.script is not None
    try:
        launch_script(spec, tgt.script, args)
    except LaunchError as exc:
        _launch_failed(console, f"{tgt.script}: {exc}", exc, as_json)
    if as_json:
        typer.echo(json.dumps({"ok": True, "script": str(tgt.script), "world_size": spec.world_size}))


def _run_generation(console: Console, tgt: Target, job: GenerationJob, spec: Any, as_json: bool) -> None:
    from accel.cli.generate import generate
    from accel.launch import LaunchError, launch_function

    if not as_json:
        console.print(
            f"accel run: {tgt.label}, {len(job.prompts)} prompt(s), {spec.devices} process(es) x "
            f"{spec.num_nodes} node(s), strategy {job.settings['strategy']}, backend {job.settings['backend']}",
            highlight=False,
        )
    try:
        results = launch_function(spec, generate, job)
    except LaunchError as exc:
        _launch_failed(console, str(exc), exc, as_json)
    summary = _summary(tgt, job, spec, results)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_summary(Console(soft_wrap=True), summary)


def _summary(tgt: Target, job: GenerationJob, spec: Any, results: dict[int, Any]) -> dict[str, Any]:
    first = results[min(results)]
    calls = first["calls"]
    return {
        "ok": True,
        "target": tgt.label,
        "world_size": spec.world_size,
        "node_rank": spec.node_rank,
        "strategy": job.settings["strategy"],
        "backend": job.settings["backend"],
        "prompts": len(job.prompts),
        "steps": job.steps,
        "seconds": first["seconds"],
        "images": [path for rank in sorted(results) for path in results[rank]["images"]],
        "calls": calls,
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
    for path in summary["images"]:
        console.print(f"wrote {path}", highlight=False)
    if summary["node_rank"] != 0:
        console.print(f"node {summary['node_rank']} done; node 0 writes the images.", highlight=False)
