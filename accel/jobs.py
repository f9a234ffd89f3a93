"""From what ``accel run`` was asked to do to a checked job: the workers' layout, settings and inputs.

Every check runs here, before any process starts: a run that cannot succeed is refused with a
:class:`~accel.request.RequestError` naming the problem and the fix, and nothing is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accel.accelerator import Accelerator, resolve_accelerator
from accel.compile.backends import BACKEND_NAMES, get_backend
from accel.compile.store import MANIFEST, EngineError, EngineStore
from accel.generation import GenerationJob
from accel.launch import LaunchSpec
from accel.plan import Plan
from accel.request import (
    DEFAULT_OUTPUT,
    GenerationRequest,
    RequestError,
    check_output,
    parse_schedule,
    read_prompts,
)
from accel.settings import AccelSettings, check_world_size
from accel.targets import Target, model_geometry


@dataclass(frozen=True)
class Layout:
    """Where the workers run: processes per node (``None``: the plan's, else 2), nodes and rendezvous."""

    devices: int | None = None
    num_nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    accelerator: str = "auto"
    timeout: float = 300.0

    def launch_spec(self) -> LaunchSpec:
        """The launcher's spec (``devices`` must be decided by now)."""
        assert self.devices is not None
        return LaunchSpec(
            devices=self.devices,
            num_nodes=self.num_nodes,
            node_rank=self.node_rank,
            master_addr=self.master_addr,
            master_port=self.master_port,
            join_timeout_s=self.timeout,
        )

    def checked_settings(self, **settings: Any) -> AccelSettings:
        """The settings every worker will make, validated here against this machine's devices."""
        acc = Accelerator(
            devices=self.devices, num_nodes=self.num_nodes, accelerator=self.accelerator, **settings
        )
        return acc.settings


def script_layout(layout: Layout) -> Layout:
    """The checked layout of a script run (2 processes per node unless given)."""
    layout = dataclasses.replace(layout, devices=layout.devices or 2)
    layout.checked_settings()
    return layout


def plan_worlds(stages: int) -> list[int]:
    """The process counts a plan of ``stages`` stages runs the hybrid window on: one stage per process on 1
    or 2, and on ``2k`` processes each CFG group of ``k`` pipelines its branch over ``k`` stages."""
    if stages == 1:
        return [1]
    return [2, 4] if stages == 2 else [2 * stages]


def worker_settings(
    target: Target, request: GenerationRequest, layout: Layout
) -> tuple[dict[str, Any], Layout]:
    """The :class:`AccelSettings` keyword arguments every worker makes for a model or plan ``target``
    (checked here against this machine's devices), and ``layout`` with its device count decided.

    Only the settings part of ``request`` counts here (precision, strategy, window guidance, schedule,
    backend, engines, strict, compile_missing; an engine directory is checked against a plan's stages
    here, before any worker starts); :class:`RequestError` if they cannot run."""
    r = request
    plan = target.plan
    strategy = r.strategy or ("hybrid" if plan is not None else "cfg")
    num_nodes, devices = layout.num_nodes, layout.devices
    if devices is None:
        world = plan_worlds(plan.devices)[0] if plan is not None else 2
        devices = world // num_nodes if world % num_nodes == 0 else 2
    layout = dataclasses.replace(layout, devices=devices)
    check_world_size(devices, num_nodes)
    world = devices * num_nodes
    if plan is not None and strategy == "hybrid" and world not in plan_worlds(plan.devices):
        stages = world if world <= 2 else world // 2
        fits = " or ".join(str(w) for w in plan_worlds(plan.devices))
        raise RequestError(
            f"the plan {target.plan_path} has {plan.devices} stages, this run has {world} processes "
            f"(--devices {devices} x --num-nodes {num_nodes}), whose hybrid window needs {stages}; run it on "
            f"{fits} processes, or make a plan with `accel plan ... --devices {stages}`."
        )
    backend = r.backend
    if r.engines is not None:
        backend = engines_backend(r.engines, backend)
    backend = backend or (plan.backend if plan is not None else "eager")
    check_backend(backend)
    settings: dict[str, Any] = dict(
        strategy=strategy,
        precision=r.precision or (plan.dtype if plan is not None else None),
        backend=backend,
        collective_timeout_s=layout.timeout,
    )
    if r.engines is not None:
        settings["engines"] = str(r.engines.resolve())
    if r.strict is not None:
        settings["strict"] = r.strict
    if r.window_guidance is not None:
        settings["window_guidance"] = r.window_guidance
    schedule: Any = parse_schedule(r.schedule)
    if schedule is None and plan is not None and plan.schedule:
        schedule = plan.schedule
    if schedule is not None:
        settings["schedule"] = schedule
    if plan is not None and strategy == "hybrid":
        settings["plan"] = str(target.plan_path.resolve()) if target.plan_path is not None else None
    checked = layout.checked_settings(**settings)
    if r.engines is not None and plan is not None and not r.compile_missing:
        device = resolve_accelerator(checked)  # "auto" is the GPU where there is one
        check_engines(target, r.engines, backend, settings["precision"], device, strategy)
    settings.update(devices=checked.devices, num_nodes=checked.num_nodes, accelerator=checked.accelerator)
    return settings, layout


def generation_job(
    target: Target, request: GenerationRequest, layout: Layout, *, progress: bool, log_level: str
) -> tuple[GenerationJob, LaunchSpec]:
    """The job each worker runs and the launch spec for ``target``; :class:`RequestError` if it cannot run."""
    r = request
    plan = target.plan
    settings, layout = worker_settings(target, request, layout)
    strategy = settings["strategy"]
    steps = r.steps or 20
    window = parse_schedule(r.schedule)
    if isinstance(window, tuple) and window[1] >= steps:
        raise RequestError(
            f"--schedule {r.schedule} ends after the last step ({steps - 1}) of a {steps}-step run (steps count "
            f"from 0), so part of the window would never run; use a window within 0-{steps - 1}."
        )
    spec = layout.launch_spec()
    prompts = read_prompts(r.prompts, r.prompts_file)
    output = r.output or DEFAULT_OUTPUT
    check_output(output)
    assert target.source is not None
    geometry = model_geometry(target.source)
    if geometry is not None:
        geometry.check("--height", r.height)
        geometry.check("--width", r.width)
    if plan is not None and strategy == "hybrid" and r.precision is not None and r.precision != plan.dtype:
        raise RequestError(
            f"the plan {target.plan_path} was profiled in {plan.dtype}, --precision {r.precision} asks for "
            f"another: drop --precision, or make a plan with `accel plan ... --dtype {r.precision}`."
        )
    height, width, batch_size = r.height, r.width, r.batch_size
    if plan is not None:
        height = height or plan.resolutions[0][0]
        width = width or plan.resolutions[0][1]
        batch_size = batch_size or plan.batches[0]
        if strategy == "hybrid":
            check_plan_shapes(plan, target.plan_path, height, width, batch_size, len(prompts))
    job = GenerationJob(
        source=target.source,
        settings=settings,
        prompts=prompts,
        negative_prompt=r.negative_prompt,
        batch_size=batch_size or 4,
        steps=steps,
        guidance=5.0 if r.guidance is None else r.guidance,
        height=height,
        width=width,
        seed=r.seed or 0,
        output=str(output),
        warmup=r.warmup or 0,
        progress=progress,
        log_level=log_level,
    )
    return job, spec


def check_plan_shapes(
    plan: Plan, plan_path: Path | None, height: int, width: int, batch_size: int, prompts: int
) -> None:
    """Refuse, before launching, a shape the plan has no bucket for (the window would fail mid-run)."""
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
        raise RequestError(
            f"the plan {plan_path} does not fit this run: {'; '.join(problems)}. Use the plan's sizes "
            "(--height/--width/--batch-size), --strategy cfg (no plan needed), or make a plan with "
            f"`accel plan ... --height {height} --width {width} --batch {batch_size}`."
        )


def check_engines(
    target: Target, engines: Path, backend: str, precision: str | None, device: str, strategy: str
) -> None:
    """Refuse an engine directory that cannot serve every stage this plan's run needs on ``device``
    (``"cuda"`` or ``"cpu"``, as the workers will run).

    The stages and keys are the ones ``accel export`` writes (:func:`accel.compile.engines.stage_jobs`),
    each checked by the engine store against the model (weights, shapes, graph, checksums, versions).
    Without this the workers would compile each unservable stage in memory, for minutes, every run.
    """
    import torch  # deferred, with the model: only a run with --engines and a plan loads it here

    from accel.compile.engines import stage_jobs
    from accel.settings import PRECISIONS
    from accel.targets import denoiser_structure, load_denoiser

    plan = target.plan
    assert plan is not None and target.source is not None
    dtype = PRECISIONS[precision or plan.dtype]
    # An engine that binds the weights at load fits any weights of its graph: the graph is checked on the
    # meta device, without reading the weights that the workers are about to load anyway.
    denoiser = denoiser_structure(target.source, dtype=dtype) if get_backend(backend).binds_weights else None
    if denoiser is None:
        denoiser, _ = load_denoiser(target.source, dtype=dtype, device=device)
    store = EngineStore(engines)
    problems: list[str] = []
    try:
        with torch.no_grad():
            for job in stage_jobs(plan, denoiser):
                if job.phase == "window" and strategy != "hybrid":
                    continue  # a cfg run uses the whole-denoiser stages only
                found = store.problems(job.key, backend, job.module, job.example_inputs, device=device)
                problems += [f"engine {job.key!r}: {p}" for p in found]
    except EngineError as exc:
        raise RequestError(str(exc)) from None
    finally:
        del denoiser
        if device == "cuda":
            torch.cuda.empty_cache()
    if problems:
        raise RequestError(
            f"--engines {engines} cannot serve this run: {'; '.join(problems)}. Re-export what does not fit "
            f"with `accel export {target.plan_path} --backend {backend} -o {engines}` (it rewrites only those "
            "engines), or pass --compile-missing to have every worker compile them in memory (slow: minutes "
            "per stage on large models)."
        )


def engines_backend(engines: Path, backend: str | None) -> str:
    """The backend to load ``engines`` with: the one given, else the one the manifest records."""
    if not (engines / MANIFEST).is_file():
        raise RequestError(
            f"--engines {engines} is not an engine directory (no {MANIFEST}). Write one with "
            f"`accel export PLAN -o {engines}`."
        )
    try:
        records = EngineStore(engines).records()
    except EngineError as exc:
        raise RequestError(str(exc)) from None
    built = sorted({r.backend for r in records.values()})
    if not built:
        raise RequestError(f"--engines {engines} holds no engines yet; run `accel export PLAN -o {engines}`.")
    if backend is None:
        if len(built) > 1:
            raise RequestError(
                f"--engines {engines} holds engines of several backends ({', '.join(built)}); pick one with "
                "--backend."
            )
        return built[0]
    if backend not in built:
        raise RequestError(
            f"--engines {engines} was exported with backend {', '.join(built)}, not {backend!r}; pass "
            f"--backend {built[0]} or export again with `accel export PLAN --backend {backend} -o {engines}`."
        )
    return backend


def check_backend(backend: str) -> None:
    """Refuse a backend that is unknown or cannot run on this machine."""
    if backend not in BACKEND_NAMES:
        raise RequestError(f"--backend {backend!r} is not one of {', '.join(BACKEND_NAMES)}.")
    reason = get_backend(backend).available()
    if reason is not None:
        raise RequestError(
            f"backend {backend!r} cannot run here: {reason} (`accel doctor` lists the usable backends)."
        )
