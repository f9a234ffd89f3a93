"""The speed suite behind ``accel bench``: every configuration against the baselines, in one process tree.

Configurations (letters as in ``docs/benchmarks/README.md``):

- ``A``: diffusers eager on one GPU, as a user runs it;
- ``B``: diffusers with ``torch.compile(denoiser, mode="reduce-overhead", fullgraph=True)`` on one GPU;
- ``B*``: what an expert user runs on one GPU: diffusers with the math-preserving recipe of the PyTorch
  "accelerating generative AI" study applied by hand (fused q/k/v projections, channels-last denoiser and
  VAE, inductor's ``conv_1x1_as_mm`` and coordinate-descent tuning) and ``torch.compile`` of the denoiser
  and the VAE decoder with ``mode="max-autotune"`` (``expert_mode="reduce-overhead"``: the same recipe
  without GEMM autotuning, which measured slower for SD3-medium and takes more than 10 minutes for SDXL);
- ``S``: accel on one GPU (both guidance branches in one call), once per backend of ``backends`` with
  that backend's engines (export them from a one-device plan, e.g. with ``--tune fused_qkv``), what accel
  adds on a single GPU;
- ``C``: accel CFG split, eager, 2 GPUs;
- ``D``: accel CFG split with each compiled backend of ``backends``, 2 GPUs;
- ``E``: accel hybrid with the first of ``backends``, 2 GPUs, once per window guidance mode.

``A``, ``B``, ``B*`` and ``S`` run in this process on the first GPU (a suite of those needs one GPU);
``C``-``E`` in one launch of 2 worker processes
afterwards, so every ratio is measured on the same machine in the same run. Each configuration gets one
short and one full warm-up call (compilation, CUDA-graph capture, planning; the first call's time is
reported as ``first_call_s``), then ``repeat`` timed calls: end to end (text encoding to decoded image,
host wall clock around the call with the device synchronised) and the denoising loop alone (CUDA events
from the first denoiser call to the end of the last step). Peak memory is per GPU. Every approximate
configuration is compared with ``A`` at the same seed (latent mean abs error, decoded-image PSNR).

With ``tiny=True`` the same suite runs the tiny offline pipelines on the CPU (gloo): a dry run of the
machinery, not a benchmark.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import torch.distributed as dist

from accel.accelerator import Accelerator
from accel.atomic import write_text_atomic
from accel.bench.configs import (
    BASELINES,
    CONFIGS,
    DEFAULT_CONFIGS,
    DEFAULT_EXPERT_MODE,
    EXPERT_MODES,
    WINDOW_MODES,
)
from accel.bench.host import CONTENDED_CORES, OtherCpu
from accel.compile.backends import BACKEND_NAMES
from accel.compile.work import CompilerWork
from accel.models import fusion
from accel.testing import build_pipeline, full_size_pipeline
from accel.testing.measure import psnr, timed_generate
from accel.version import __version__
from accel.wrapper import find_denoiser, unwrap

log = logging.getLogger(__name__)

GUIDANCE: dict[str, float] = {"sdxl": 5.0, "sd3": 7.0}
PROMPT = "an astronaut riding a horse on the moon, detailed, 8k"


def parse_names(text: str) -> tuple[str, ...]:
    """A comma-separated command-line list (``"A,B, D"``) as a tuple of names."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_schedule(text: str) -> Any:
    """A command-line schedule: a mode name (``"adaptive"``, ``"never"``...) or ``"START,END"``."""
    if "," in text:
        start, end = (int(v) for v in text.split(","))
        return (start, end)
    return text


@dataclass(frozen=True, kw_only=True)
class SuiteSettings:
    """One run of the suite: which model, shape and configurations.

    Attributes:
        model: ``"sdxl"`` or ``"sd3"`` (full-size architecture, random weights, fp16).
        height, width: image size in pixels.
        steps: denoising steps; ``guidance``: CFG scale (default 5.0 SDXL, 7.0 SD3).
        configs: subset of :data:`CONFIGS`.
        backends: compiled backends for ``S`` and ``D`` (each) and ``E`` (the first).
        window_modes: window guidance modes for ``E``.
        schedule: hybrid schedule for ``E`` (``"adaptive"``, ``"never"``, ``(start, end)``...).
        repeat: timed calls per configuration (the median is reported); ``warmup_steps``: the short
            warm-up call.
        engines: engine directories (``accel export``), one per backend of ``backends`` in order (``S``,
            ``D``, ``E``; one directory may hold the engines of a one-device and a two-device plan); a backend
            without one compiles in memory.
        plan: the plan file for ``E`` (the one the engines were exported from); ``None`` plans on the
            first hybrid call.
        seed: the seed of every call.
        tiny: run the tiny offline pipelines on the CPU (a dry run).
        expert_mode: B*'s ``torch.compile`` mode on a GPU, one of :data:`EXPERT_MODES`.
    """

    model: str = "sdxl"
    height: int = 1024
    width: int = 1024
    steps: int = 50
    guidance: float | None = None
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    backends: tuple[str, ...] = ("inductor",)
    window_modes: tuple[str, ...] = WINDOW_MODES
    schedule: Any = "adaptive"
    repeat: int = 3
    warmup_steps: int = 3
    engines: tuple[str, ...] = ()
    plan: str | None = None
    seed: int = 0
    tiny: bool = False
    expert_mode: str = DEFAULT_EXPERT_MODE

    def __post_init__(self) -> None:
        if self.expert_mode not in EXPERT_MODES:
            raise ValueError(f"expert mode {self.expert_mode!r} is not one of {', '.join(EXPERT_MODES)}.")
        if self.model not in GUIDANCE:
            raise ValueError(f"model {self.model!r} is not one of {', '.join(GUIDANCE)}.")
        unknown = sorted(set(self.configs) - set(CONFIGS))
        if unknown:
            raise ValueError(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}.")

        bad = sorted(set(self.backends) - set(BACKEND_NAMES) | ({"eager"} & set(self.backends)))
        if bad or not self.backends:
            raise ValueError(
                f"backends {bad or '(none)'}: choose compiled ones of {', '.join(BACKEND_NAMES[1:])}."
            )
        bad_modes = sorted(set(self.window_modes) - set(WINDOW_MODES))
        if bad_modes:
            raise ValueError(f"unknown window modes {bad_modes}; choose from {', '.join(WINDOW_MODES)}.")
        if self.repeat < 1 or self.steps < 1:
            raise ValueError("steps and repeat must be >= 1.")
        if len(self.engines) > len(self.backends):
            raise ValueError(
                f"{len(self.engines)} engine directories for {len(self.backends)} backend(s) "
                f"({', '.join(self.backends)}): give one per backend, in the same order."
            )

    def engines_for(self, backend: str) -> str | None:
        """The engine directory given for ``backend`` (``None``: it compiles in memory)."""
        index = self.backends.index(backend)
        return self.engines[index] if index < len(self.engines) else None

    @property
    def cfg_scale(self) -> float:
        return GUIDANCE[self.model] if self.guidance is None else self.guidance

    @property
    def device_kind(self) -> str:
        return "cpu" if self.tiny else "cuda"

    @property
    def gpus(self) -> int:
        """GPUs the configurations need: 2 with any of C, D, E, else 1."""
        return 2 if any(c in self.configs for c in "CDE") else 1


#: What a call report says of the compiled stages, kept in each configuration's entry: how each stage
#: was made, the seconds spent making it and in its first call, and the compiler's work meanwhile.
STAGE_KEYS = (
    "compiled_stages",
    "loaded_stages",
    "eager_stages",
    "stage_seconds",
    "stage_first_call_seconds",
    "compiler_work",
)


@dataclass
class Measured:
    """The timings and outputs of one configuration (one rank)."""

    name: str
    e2e_s: list[float] = field(default_factory=list)
    loop_s: list[float] = field(default_factory=list)
    first_call_s: float = 0.0
    peak_mem_gib: list[float] = field(default_factory=list)
    other_cpu_cores: float | None = None
    warmup_compiler_work: dict[str, int] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    latents: Any = None
    image: Any = None

    def summary(self) -> dict[str, Any]:
        out = {
            "e2e_s": self.e2e_s,
            "loop_s": self.loop_s,
            "e2e_median_s": statistics.median(self.e2e_s),
            "loop_median_s": statistics.median(self.loop_s),
            "first_call_s": self.first_call_s,
            "peak_mem_gib": self.peak_mem_gib,
            "other_cpu_cores": self.other_cpu_cores,
            "warmup_compiler_work": self.warmup_compiler_work,
        }
        report = self.report or {}
        for key in ("tau1", "tau2", "window", "steps", *STAGE_KEYS):
            if key in report:
                out[key] = report[key]
        return out


def _denoiser_name(pipe: Any) -> str:

    return find_denoiser(pipe)[0]


def _call(
    pipe: Any, denoiser: torch.nn.Module, s: SuiteSettings, steps: int, device: torch.device
) -> dict[str, Any]:

    run = timed_generate(
        pipe,
        denoiser,
        device,
        PROMPT,
        height=s.height,
        width=s.width,
        steps=steps,
        guidance=s.cfg_scale,
        seed=s.seed,
    )
    run["image"] = np.asarray(run.pop("images"))
    return run


def measure(
    pipe: Any, denoiser: torch.nn.Module, s: SuiteSettings, name: str, device: torch.device
) -> Measured:
    """Warm up (short call, then a full one), then time ``repeat`` calls of ``pipe``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, before = time.perf_counter(), CompilerWork.now()
    _call(pipe, denoiser, s, min(s.warmup_steps, s.steps), device)
    first = time.perf_counter() - start
    if getattr(getattr(pipe, "runtime", None), "plan", False) is not False:
        # Hybrid: the adaptive window may start late, so its stages are first used in a full call.
        _call(pipe, denoiser, s, s.steps, device)
    result = Measured(name=name, first_call_s=first)
    # Whatever compiled it (torch.compile for B and B*, accel's stages for the others): graphs generated or
    # read from the cache, kernel benchmark calls, so a slow first call says what it was spent on.
    result.warmup_compiler_work = asdict(CompilerWork.now().since(before))
    with OtherCpu() as other:
        for _ in range(s.repeat):
            run = _call(pipe, denoiser, s, s.steps, device)
            result.e2e_s.append(run["e2e_s"])
            result.loop_s.append(run["loop_s"])
            result.latents, result.image = run["latents"], run["image"]
    result.other_cpu_cores = other.cores
    if other.cores is not None and other.cores >= CONTENDED_CORES:
        log.warning(
            "%s was timed while other processes kept %.1f CPU cores busy: a launch-bound loop runs slower "
            "then; measure it again on a quiet host",
            name,
            other.cores,
        )
    if device.type == "cuda":
        result.peak_mem_gib = [torch.cuda.max_memory_allocated(device) / 2**30]
    report = getattr(pipe, "last_report", None)
    result.report = asdict(report) if report is not None else None
    log.info(
        "%s: loop %.3f s, end to end %.3f s",
        name,
        statistics.median(result.loop_s),
        statistics.median(result.e2e_s),
    )
    return result


def _pipeline(s: SuiteSettings, device: torch.device) -> Any:

    if s.tiny:
        return build_pipeline(s.model)
    return full_size_pipeline(s.model, dtype=torch.float16, device=device)


@contextlib.contextmanager
def _compiled_denoiser(pipe: Any) -> Iterator[None]:
    """Configuration B: the denoiser as diffusers' docs compile it; put back afterwards."""
    name = _denoiser_name(pipe)
    original = getattr(pipe, name)
    mode = None if original.device.type == "cpu" else "reduce-overhead"
    setattr(pipe, name, torch.compile(original, mode=mode, fullgraph=True))
    try:
        yield
    finally:
        setattr(pipe, name, original)


#: Inductor settings of the recipe (B*): all exact up to floating-point reordering.
RECIPE_INDUCTOR = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}


@contextlib.contextmanager
def _expert_compiled(pipe: Any, mode: str = "max-autotune") -> Iterator[None]:
    """Configuration B*: the recipe applied by hand to the whole denoiser and the VAE, then
    ``torch.compile``; everything put back afterwards (projections unfused, contiguous weights)."""
    import torch._inductor.config as inductor_config

    name = _denoiser_name(pipe)
    original, vae = getattr(pipe, name), pipe.vae
    fusable = [m for m in (original, vae) if fusion.can_fuse(m)]
    compile_mode = None if original.device.type == "cpu" else mode  # inductor's CPU defaults: the dry run
    for module in fusable:
        fusion.fuse(module)
    for module in (original, vae):
        module.to(memory_format=torch.channels_last)
    try:
        # Compilation happens at the first call, inside this patch.
        with inductor_config.patch(RECIPE_INDUCTOR):
            setattr(pipe, name, torch.compile(original, mode=compile_mode, fullgraph=True))
            vae.decode = torch.compile(vae.decode, mode=compile_mode, fullgraph=True)
            yield
    finally:
        setattr(pipe, name, original)
        vars(vae).pop("decode", None)  # the class's own decode again
        for module in (original, vae):
            module.to(memory_format=torch.contiguous_format)
        for module in fusable:
            fusion.unfuse(module)


def single_gpu(
    s: SuiteSettings, on_measured: Callable[[dict[str, Measured]], None] | None = None
) -> dict[str, Measured]:
    """Configurations A, B, B* and S in this process (first GPU, or the CPU with ``tiny``);
    ``on_measured`` gets the configurations measured so far after each one."""
    device = torch.device("cpu") if s.tiny else torch.device("cuda", 0)
    pipe = _pipeline(s, device)
    denoiser = getattr(pipe, _denoiser_name(pipe))
    out: dict[str, Measured] = {}

    def notify() -> None:
        if on_measured is not None:
            on_measured(dict(out))

    if "A" in s.configs or any(c in s.configs for c in "CDE"):
        # A is also the exact reference every other configuration is compared with.
        out["A"] = measure(pipe, denoiser, s, "A", device)
        notify()
    if "B" in s.configs:
        with _compiled_denoiser(pipe):
            # Timed on the compiled wrapper: a hook on the inner module would be traced into the graph.
            out["B"] = measure(pipe, getattr(pipe, _denoiser_name(pipe)), s, "B", device)
            notify()
        torch._dynamo.reset()
    for backend in s.backends if "S" in s.configs else ():
        wrapped = Accelerator(devices=1, accelerator=s.device_kind).wrap(
            pipe, backend=backend, engines=s.engines_for(backend)
        )
        try:
            out[f"S-{backend}"] = measure(wrapped, denoiser, s, f"S-{backend}", device)
            notify()
        finally:
            unwrap(wrapped)
    if "B*" in s.configs:  # last: its compilation is the longest (max-autotune: over 10 minutes for SDXL)
        with _expert_compiled(pipe, s.expert_mode):
            out["B*"] = measure(pipe, getattr(pipe, _denoiser_name(pipe)), s, "B*", device)
            notify()
        torch._dynamo.reset()
    del pipe, denoiser
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _worker(acc: Any, s: SuiteSettings) -> dict[str, dict[str, Any]]:
    """Configurations C, D and E on every rank; rank 0 returns every rank's results."""

    device = acc.device
    pipe = _pipeline(s, device)
    denoiser = getattr(pipe, _denoiser_name(pipe))
    runs: list[tuple[str, dict[str, Any]]] = []
    if "C" in s.configs:
        runs.append(("C", {"strategy": "cfg"}))
    if "D" in s.configs:
        for backend in s.backends:
            runs.append(
                (f"D-{backend}", {"strategy": "cfg", "backend": backend, "engines": s.engines_for(backend)})
            )
    if "E" in s.configs:
        backend = s.backends[0]
        for mode in s.window_modes:
            runs.append(
                (
                    f"E-{backend}-{mode}",
                    {
                        "strategy": "hybrid",
                        "backend": backend,
                        "engines": s.engines_for(backend),
                        "window_guidance": mode,
                        "schedule": s.schedule,
                    },
                )
            )
    results: dict[str, dict[str, Any]] = {}
    plan_file: str | None = s.plan
    for name, overrides in runs:
        if overrides.get("strategy") == "hybrid" and plan_file is not None:
            overrides["plan"] = plan_file  # one plan for every window mode: same stages, same engines
        wrapped = acc.wrap(pipe, **overrides)
        measured = measure(wrapped, denoiser, s, name, device)
        plan = getattr(wrapped.runtime, "plan", None)
        if plan is not None and plan_file is None:
            plan_file = _shared_plan(acc, plan)
        unwrap(wrapped)
        gathered: list[Any] = [None] * acc.world_size
        mine = {"peak_mem_gib": measured.peak_mem_gib, "report": measured.report}
        dist.all_gather_object(gathered, mine)
        entry = measured.summary()
        entry["peak_mem_gib"] = [g["peak_mem_gib"][0] if g["peak_mem_gib"] else None for g in gathered]
        entry["per_rank"] = [_rank_report(g["report"]) for g in gathered]
        entry["latents"], entry["image"] = measured.latents, measured.image
        if plan is not None:
            entry["plan"] = {
                "stages": [list(map(list, st.segments)) for st in plan.stages],
                "layout": plan.layout,
                "balance": plan.balance,
                "bytes_per_step": plan.bytes_per_step,
            }
        results[name] = entry
    return results


def _rank_report(report: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("bytes_sent", "pipeline_bytes", "phase_seconds", *STAGE_KEYS)
    return {k: (report or {}).get(k) for k in keys}


def _shared_plan(acc: Any, plan: Any) -> str:

    path = Path(tempfile.gettempdir()) / f"accel-bench-plan-{plan.config_hash}.json"
    if acc.rank == 0:
        plan.save(path)
    acc.barrier()
    return str(path)


def _deviation(run: dict[str, Any] | Measured, exact: Measured) -> dict[str, float]:

    latents = run.latents if isinstance(run, Measured) else run["latents"]
    image = run.image if isinstance(run, Measured) else run["image"]
    diff = (latents - exact.latents).abs()
    value = psnr(exact.image, image)
    return {
        "latent_mean_abs_err": float(diff.mean()),
        "latent_max_abs_err": float(diff.max()),
        "image_psnr_db": value if math.isfinite(value) else float("inf"),
    }


def run_suite(
    s: SuiteSettings,
    *,
    on_phase: Callable[[str], None] | None = None,
    on_partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the suite; returns the JSON-able result (configurations, ratios, environment).

    ``on_partial`` gets the result of the one-GPU configurations measured so far after each one (marked
    ``"complete": False``), so that a run cut short still leaves its measurements.
    """

    t0 = time.perf_counter()
    if on_phase is not None:
        on_phase("one GPU: A, B, S, B*")
    partial = (
        None if on_partial is None else (lambda done: on_partial(_result(s, done, {}, t0, complete=False)))
    )
    single = single_gpu(s, partial)
    multi: dict[str, dict[str, Any]] = {}
    if any(c in s.configs for c in "CDE"):
        if on_phase is not None:
            on_phase("2 GPUs: C, D, E")
        acc = Accelerator(devices=2, accelerator=s.device_kind, collective_timeout_s=1800.0)
        multi = acc.launch(_worker, s)
    return _result(s, single, multi, t0)


def _result(
    s: SuiteSettings,
    single: dict[str, Measured],
    multi: dict[str, dict[str, Any]],
    t0: float,
    *,
    complete: bool = True,
) -> dict[str, Any]:
    exact = single.get("A")
    configs: dict[str, Any] = {}
    for name, measured in single.items():
        entry = measured.summary()
        if exact is not None and name != "A":
            entry.update(_deviation(measured, exact))
        configs[name] = entry
    for name, entry in multi.items():
        if exact is not None:
            entry.update(_deviation(entry, exact))
        entry.pop("latents", None)
        entry.pop("image", None)
        configs[name] = entry
    ratios = _ratios(configs)
    return {
        "suite": "speed",
        "model": s.model,
        "height": s.height,
        "width": s.width,
        "steps": s.steps,
        "guidance": s.cfg_scale,
        "batch": 1,
        "dtype": "fp32" if s.tiny else "fp16",
        "tiny": s.tiny,
        "repeat": s.repeat,
        "schedule": s.schedule,
        "backends": list(s.backends),
        "engines": {backend: s.engines_for(backend) for backend in s.backends},
        "engine_tuning": {backend: engine_tuning(s.engines_for(backend)) for backend in s.backends},
        "plan": s.plan,
        "expert_mode": s.expert_mode,
        "environment": environment(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
        "configs": configs,
        "ratios": ratios,
        "wall_s": time.perf_counter() - t0,
        "configs_requested": list(s.configs),
        "complete": complete,
    }


def engine_tuning(directory: str | None) -> dict[str, str] | None:
    """The tuning each engine of ``directory`` was built with (:meth:`Tuning.describe`), for the report."""
    if directory is None:
        return None
    from accel.compile.store import TUNING_NOTE, EngineError, EngineStore, describe_tuning, record_tuning

    try:
        records = sorted(EngineStore(directory).records().items())
        return {key: describe_tuning(record_tuning(r), r.extra.get(TUNING_NOTE)) for key, r in records}
    except (EngineError, OSError, ValueError):  # unreadable: the run itself says why
        return None


def _ratios(configs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Speed-ups of every configuration over each baseline (A, B, B*; loop and end to end)."""
    out: dict[str, dict[str, float]] = {}
    for base in BASELINES:
        if base not in configs:
            continue
        for name, entry in configs.items():
            if name == base:
                continue
            for metric in ("loop", "e2e"):
                key = f"{metric}_median_s"
                out.setdefault(name, {})[f"{metric}_vs_{base}"] = configs[base][key] / entry[key]
    return out


def versions() -> dict[str, str]:
    """torch, diffusers and accel versions for the report."""
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "accel": __version__}


def environment() -> dict[str, Any]:
    """GPU, driver and CPU facts for the report."""

    env: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                .stdout.split("\n")[0]
                .strip()
            )
        except OSError:
            env["driver"] = None
    return env


def save(result: dict[str, Any], path: Path) -> None:
    """Write the result as JSON (atomically)."""

    write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")
