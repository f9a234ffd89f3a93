"""``wrap``/``unwrap``: attach accel to a diffusers pipeline without changing the user's code.

The wrapper delegates every attribute to the original pipeline and keeps its call signature. The
only change to the pipeline itself is a removable diffusers hook on the denoiser (``pipe.unet`` or
``pipe.transformer``); :func:`unwrap` removes it and returns the original object.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry

from accel.errors import AccelError
from accel.models import fusion
from accel.plan import Plan, PlanError, build_plan, config_hash, load_plan, weights_fingerprint
from accel.runtime.comm import Communicator
from accel.runtime.compiled import COMPILED_HOOK, DECODER_HOOK, CompiledDecoderHook, CompiledDenoiserHook
from accel.runtime.group_pipeline import GroupPipelineHook
from accel.runtime.groups import GroupLayout
from accel.runtime.guidance import HOOK_NAME, CFGSplitHook
from accel.runtime.pipeline import HybridHook
from accel.runtime.window import WindowHook, WindowOptions
from accel.settings import AccelSettings
from accel.source import ModelSource

if TYPE_CHECKING:
    from accel.compile.runner import StageRunner
    from accel.models import DenoiserAdapter

log = logging.getLogger(__name__)

DENOISER_ATTRIBUTES = ("unet", "transformer")


class UnsupportedPipelineError(AccelError, TypeError):
    """The object is not a diffusers pipeline with a denoiser accel can split."""


@dataclass(frozen=True)
class ProcessContext:
    """What a wrapped pipeline needs of the process it runs in (the Accelerator makes it once launched).

    Attributes:
        owner: the object that launched this process (``AcceleratedPipeline.accelerator``).
        settings: the owner's settings (a pipeline may override the per-pipeline ones).
        device, rank, world_size, layout: this process's device, global rank, process count and CFG groups.
        comm: the communicator (``None`` with one process).
        stage_runner: the compiled stage callables of a denoiser for some settings, shared by its wraps.
        report_failure: tells every other rank that this rank failed, so that they stop waiting.
    """

    owner: Any
    settings: AccelSettings
    device: torch.device
    rank: int
    world_size: int
    layout: GroupLayout
    comm: Communicator | None
    stage_runner: Callable[[torch.nn.Module, AccelSettings], StageRunner]
    report_failure: Callable[[BaseException], None]


@dataclass(frozen=True)
class CallReport:
    """What one pipeline call did, for logging and for ``pipe.last_report``.

    The hybrid fields (``strategy="hybrid"``) stay at their defaults otherwise: ``tau1``/``tau2`` as the
    schedule decided them (``None``: no switch), ``window`` the pipelined steps ``(first, last)`` after
    clamping, ``steps``/``phase_seconds`` per phase (``"cfg"``, ``"pipeline"``; host wall time from one
    denoiser call to the next, no device syncs added), ``pipeline_bytes`` sent by this rank in the window
    (boundary tensors, hand-over and prediction; also counted in ``bytes_sent``), ``rates`` the branch gap
    ``r_i`` per step (NaN for pipelined steps), ``plan_seconds`` spent planning at a new shape.
    ``compiled_stages``/``loaded_stages``/``eager_stages``: stage callables compiled in memory, loaded
    from the engine directory, or left eager after a failure, since wrapping (compiled backends only);
    ``stage_seconds`` the time spent compiling or loading them, since wrapping, and
    ``stage_first_call_seconds`` in their first calls (``torch.compile``'s lazy compilation, CUDA-graph
    capture); ``compiler_work`` what torch's compiler did for them meanwhile (graphs generated, graphs read
    from its cache, kernel benchmarks: :class:`accel.compile.work.CompilerWork`; no graphs generated and
    no benchmarks when engines served every stage); ``rebound_stages`` how many times a stage was bound to
    weights replaced after it was compiled or loaded.
    """

    rank: int
    world_size: int
    denoiser_calls: int
    split_calls: int
    collectives: int
    bytes_sent: int
    seconds: float
    strategy: str = "cfg"
    tau1: int | None = None
    tau2: int | None = None
    window: tuple[int, int] | None = None
    steps: dict[str, int] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    pipeline_bytes: int = 0
    rates: tuple[float, ...] = ()
    plan_seconds: float = 0.0
    compiled_stages: int = 0
    loaded_stages: int = 0
    eager_stages: int = 0
    stage_seconds: float = 0.0
    stage_first_call_seconds: float = 0.0
    compiler_work: dict[str, int] = field(default_factory=dict)
    rebound_stages: int = 0


def find_denoiser(pipe: Any) -> tuple[str, torch.nn.Module]:
    """The denoiser of a diffusers pipeline and its attribute name."""
    for name in DENOISER_ATTRIBUTES:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    components = sorted(getattr(pipe, "components", {}) or {})
    raise UnsupportedPipelineError(
        f"{type(pipe).__name__} has no denoiser accel can split: expected a torch module at "
        f"`pipe.unet` or `pipe.transformer` (components: {components or 'none'}). "
        "Pass a diffusers pipeline such as StableDiffusionXLPipeline or StableDiffusion3Pipeline."
    )


def model_fingerprint(model: torch.nn.Module) -> str:
    """Class, architecture config and weights sample of a model, to check that all ranks loaded the same one."""
    return f"{type(model).__name__}/{config_hash(model)}/{weights_fingerprint(model)}"


class AcceleratedPipeline:
    """A diffusers pipeline accelerated by accel: call it exactly like the original.

    Attributes read or written on the wrapper go to the original pipeline. ``last_report`` holds the
    :class:`CallReport` of the latest call; ``pipeline`` is the original object.
    """

    def __init__(
        self,
        pipe: Any,
        process: ProcessContext,
        hook: CFGSplitHook | None,
        restore: list[_HookSite],
        runner: StageRunner | None = None,
    ) -> None:
        object.__setattr__(self, "_pipe", pipe)
        object.__setattr__(self, "_process", process)
        object.__setattr__(self, "_hook", hook)
        object.__setattr__(self, "_restore", restore)
        object.__setattr__(self, "_runner", runner)
        object.__setattr__(self, "last_report", None)

    @property
    def pipeline(self) -> Any:
        """The original diffusers pipeline."""
        return self._pipe

    @property
    def accelerator(self) -> Any:
        """The Accelerator this pipeline runs on."""
        return self._process.owner

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        pipe = object.__getattribute__(self, "_pipe")
        if pipe is None:
            raise RuntimeError("this accelerated pipeline was unwrapped; use the object unwrap() returned.")
        return getattr(pipe, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "last_report":
            object.__setattr__(self, name, value)
        else:
            setattr(self._pipe, name, value)

    @property
    def runtime(self) -> CFGSplitHook | None:
        """The denoiser hook (``None`` with one process): ``CFGSplitHook`` for ``strategy="cfg"``; for
        ``strategy="hybrid"`` ``HybridHook`` on 2 processes, ``GroupPipelineHook`` on ``2k > 2``.

        ``pipe.runtime.recorder = records.append`` collects a ``StepRecord`` per denoiser call (tests).
        """
        return self._hook

    def to(self, *args: Any, **kwargs: Any) -> AcceleratedPipeline:
        """Move/cast the original pipeline; returns the wrapper."""
        self._pipe.to(*args, **kwargs)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self._pipe
        if pipe is None:
            raise RuntimeError("this accelerated pipeline was unwrapped; use the object unwrap() returned.")
        acc = self._process
        comm = acc.comm
        if comm is not None and kwargs.get("generator") is None and kwargs.get("latents") is None:
            # Ranks must draw the same initial noise or they diverge: agree on one seed per call.
            seed = comm.broadcast_int(int(torch.randint(0, 2**62, ()).item()) if acc.rank == 0 else 0)
            kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
        hook = self._hook
        if hook is not None:
            hook.reset_state(hook_module(pipe))
        if comm is not None:
            comm.stats.reset()
        start = time.perf_counter()
        try:
            if self._runner is not None:
                # Weights replaced since the last call are bound again (or refused), never served stale.
                self._runner.check_weights()
            output = pipe(*args, **kwargs)
        except BaseException as exc:
            acc.report_failure(exc)
            raise
        extra: dict[str, Any] = {}
        if isinstance(hook, WindowHook):
            stats = hook.end_call()
            extra = dict(
                strategy="hybrid",
                tau1=stats.tau1,
                tau2=stats.tau2,
                window=stats.window,
                steps=dict(stats.steps),
                phase_seconds=dict(stats.seconds),
                pipeline_bytes=stats.pipeline_bytes,
                rates=tuple(stats.rates),
                plan_seconds=stats.planned_s,
            )
        runner = self._runner
        if runner is not None:
            counts = runner.counts
            extra.update(
                compiled_stages=counts.compiled,
                loaded_stages=counts.loaded,
                eager_stages=counts.fallbacks,
                stage_seconds=counts.seconds,
                stage_first_call_seconds=counts.first_call_seconds,
                compiler_work=asdict(counts.work),
                rebound_stages=counts.rebound,
            )
        report = CallReport(
            rank=acc.rank,
            world_size=acc.world_size,
            denoiser_calls=hook.calls if hook is not None else 0,
            split_calls=hook.split_calls if hook is not None else 0,
            collectives=comm.stats.collectives if comm is not None else 0,
            bytes_sent=comm.stats.bytes_sent if comm is not None else 0,
            seconds=time.perf_counter() - start,
            **extra,
        )
        self.last_report = report
        log.info(
            "rank %d: %d denoiser calls (%d split), %d collectives, %.1f KiB sent, %.3f s",
            report.rank,
            report.denoiser_calls,
            report.split_calls,
            report.collectives,
            report.bytes_sent / 1024,
            report.seconds,
        )
        return output

    def __repr__(self) -> str:
        return f"AcceleratedPipeline({type(self._pipe).__name__}, {self._process.owner!r})"


def hook_module(pipe: Any) -> torch.nn.Module:
    return find_denoiser(pipe)[1]


@dataclass
class _HookSite:
    """A module accel hooked and what it was like before, so that unwrapping puts it back exactly."""

    module: torch.nn.Module
    had_registry: bool
    had_forward_attr: bool
    names: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, module: torch.nn.Module) -> _HookSite:
        return cls(
            module=module,
            had_registry=getattr(module, "_diffusers_hook", None) is not None,
            had_forward_attr="forward" in vars(module),
        )

    def register(self, hook: Any, name: str) -> None:
        HookRegistry.check_if_exists_or_initialize(self.module).register_hook(hook, name)
        self.names.append(name)

    def remove(self) -> None:
        module = self.module
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            return
        for name in reversed(self.names):
            if registry.get_hook(name) is not None:
                registry.remove_hook(name, recurse=False)
        if not self.had_registry and not registry.hooks:
            del module._diffusers_hook
        if not self.had_forward_attr and "forward" in vars(module):
            del module.forward


def wrap_pipeline(
    pipe: Any, process: ProcessContext, settings: AccelSettings | None = None
) -> AcceleratedPipeline:
    """Attach accel to ``pipe`` (see :func:`accel.wrap`) in the process ``process`` describes;
    ``settings``: its settings, possibly with per-pipeline overrides."""
    if isinstance(pipe, AcceleratedPipeline):
        raise ValueError("this pipeline is already wrapped by accel; call accel.unwrap(pipe) first.")
    _, denoiser = find_denoiser(pipe)
    registry_before = getattr(denoiser, "_diffusers_hook", None)
    if registry_before is not None and registry_before.get_hook(HOOK_NAME) is not None:
        raise ValueError("the denoiser already carries an accel hook; call accel.unwrap(pipe) first.")
    dtype = process.settings.dtype
    if dtype is None:
        pipe.to(process.device)
    else:
        pipe.to(process.device, dtype)
    comm = process.comm
    if comm is not None:
        comm.check_same("the denoiser (class, config, weights)", model_fingerprint(denoiser))
    site = _HookSite.of(denoiser)
    restore = [site]
    settings = process.settings if settings is None else settings
    if comm is not None and settings is not process.settings:
        comm.check_same("the pipeline settings", repr(settings))
    loaded: Plan | None = None
    if settings.strategy == "hybrid" and settings.plan is not None and comm is not None:
        problem: PlanError | None = None
        stages = process.layout.window_stages
        try:
            loaded = load_plan(settings.plan)
            try:
                loaded.validate_for(denoiser, devices=stages)
            except PlanError as exc:
                if stages == process.world_size:
                    raise
                raise PlanError(
                    f"on {process.world_size} devices each CFG group of {stages} ranks pipelines its "
                    f"branch over {stages} stages: {exc}"
                ) from None
            status = json.dumps(loaded.to_dict(), sort_keys=True)
        except PlanError as exc:
            problem, status = exc, f"unusable: {exc}"
        # Every rank learns whether every rank could use the plan (no rank is left waiting).
        comm.check_same("the plan file", status)
        if problem is not None:
            raise problem
    runner: StageRunner | None = None
    if settings.backend != "eager":
        runner = _install_compiled(pipe, process, site, restore, settings)
    hook: CFGSplitHook | None = None
    if comm is not None:

        def guided() -> bool:
            return bool(getattr(pipe, "do_classifier_free_guidance", False))

        def split_problem() -> str | None:
            return _split_problem(pipe)

        if settings.strategy == "hybrid":
            stages = process.layout.window_stages
            options: WindowOptions = dict(
                guided=guided,
                num_steps=lambda: _num_steps(pipe),
                schedule=settings.schedule,
                get_plan=_PlanSource(pipe, denoiser, loaded, comm.rank, stages),
                runner=runner,
                vae_scale_factor=int(getattr(pipe, "vae_scale_factor", 8) or 8),
                split_problem=split_problem,
            )
            if comm.world_size == 2:
                hook = HybridHook(comm, guided, window_guidance=settings.window_guidance, **options)
            else:
                if comm.rank == 0:
                    _note_window_guidance(settings, comm.world_size, stages)
                hook = GroupPipelineHook(comm, guided, **options)
        else:
            hook = CFGSplitHook(comm, owns_result=guided, split_problem=split_problem)
        # Registered last, so it is outermost: it slices the batch, then calls the compiled stage.
        site.register(hook, HOOK_NAME)
    return AcceleratedPipeline(pipe, process, hook, restore, runner)


def _install_compiled(
    pipe: Any, process: ProcessContext, site: _HookSite, restore: list[_HookSite], settings: AccelSettings
) -> StageRunner:
    """Route the denoiser (and the VAE decoder) through compiled stages of ``settings.backend``."""
    runner = process.stage_runner(site.module, settings)
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    site.register(CompiledDenoiserHook(runner, scale), COMPILED_HOOK)
    decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
    if settings.compile_vae and isinstance(decoder, torch.nn.Module):
        vae_site = _HookSite.of(decoder)
        vae_site.register(CompiledDecoderHook(runner, decoder), DECODER_HOOK)
        restore.append(vae_site)
    return runner


def _split_problem(pipe: Any) -> str | None:
    """Why the pipeline's current denoiser batch must not be cut into rows (``None``: it may)."""
    if getattr(pipe, "do_perturbed_attention_guidance", False):
        return (
            "perturbed-attention guidance (PAG) batches three branches (unconditional, conditional, "
            "perturbed) that its attention processors tell apart by chunking the batch inside the denoiser, "
            "so no rank can run a part of it alone; call with pag_scale=0 (or a pipeline without PAG) for "
            "the CFG split and the window"
        )
    return None


def _num_steps(pipe: Any) -> int | None:
    """Steps of the current call: diffusers sets ``_num_timesteps`` before its loop."""
    value = getattr(pipe, "_num_timesteps", None)
    if isinstance(value, int) and value > 0:
        return value
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    return len(timesteps) if timesteps is not None else None


def _note_window_guidance(settings: AccelSettings, world: int, stages: int) -> None:
    """On ``2k > 2`` devices the window pipelines both branches, so ``window_guidance`` has nothing to
    choose: say so (once per wrap, on rank 0) where it was set to something else than the default."""
    default = type(settings)().window_guidance
    if settings.window_guidance != default:
        log.info(
            "window_guidance=%r is ignored on %d devices: each CFG group pipelines its own branch over %d "
            "stages, so guidance in the window uses both branches (exact apart from stale activations).",
            settings.window_guidance,
            world,
            stages,
        )


class _PlanSource:
    """The plan for a call's shape: the loaded plan file (validated for the shape), or one made by
    profiling on rank 0 at that shape and broadcast, so that every rank cuts the model alike.

    ``stages``: the plan's stage count (2 on 2 devices, ``k`` on ``2k > 2``: one per rank of a CFG group).
    """

    def __init__(
        self, pipe: Any, model: torch.nn.Module, loaded: Plan | None, rank: int, stages: int
    ) -> None:
        self.pipe = pipe
        self.model = model
        self.loaded = loaded
        self.rank = rank
        self.stages = stages
        self.made: dict[tuple[Any, ...], Plan] = {}

    def __call__(
        self, adapter: DenoiserAdapter, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int
    ) -> Plan:

        sample = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("sample")
        if sample is None:
            sample = kwargs.get("hidden_states")
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            raise ValueError("the denoiser's first input is not a [batch, channels, height, width] latent.")
        scale = int(getattr(self.pipe, "vae_scale_factor", 8) or 8)
        height, width = int(sample.shape[-2]) * scale, int(sample.shape[-1]) * scale
        if self.loaded is not None:
            self.loaded.validate_for(
                self.model, height=height, width=width, batch=batch, devices=self.stages, check_weights=False
            )
            return self.loaded
        text = kwargs.get("encoder_hidden_states")
        text_len = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.dim() == 3 else None
        key = (height, width, batch, text_len, sample.dtype, sample.device)
        plan = self.made.get(key)
        if plan is not None:
            return plan
        payload: list[Any] = [None]
        if self.rank == 0:
            cpu = sample.device.type == "cpu"
            made = build_plan(
                self.model,
                source=ModelSource(
                    "folder", str(getattr(self.pipe, "name_or_path", "") or "<in memory>")
                ).to_dict(),
                height=height,
                width=width,
                devices=self.stages,
                batch=batch,
                vae_scale_factor=scale,
                text_len=text_len,
                warmup=1 if cpu else 3,
                repeat=3 if cpu else 10,
                count_flops=False,
            )
            payload[0] = made.to_dict()
        dist.broadcast_object_list(payload, src=0)
        plan = Plan.from_dict(payload[0])
        self.made[key] = plan
        log.info("rank %d: planned %dx%d batch %d: stages %s", self.rank, height, width, batch, plan.stages)
        return plan


def unwrap(pipe: Any) -> Any:
    """Remove accel from a wrapped pipeline and return the original pipeline object.

    The denoiser's ``forward`` and hook registry are put back exactly as they were, and q/k/v projections
    accel fused for engines built fused are unfused; the pipeline stays on the device it was moved to.
    Anything that is not an accelerated pipeline is returned unchanged.
    """
    if not isinstance(pipe, AcceleratedPipeline):
        return pipe
    original = pipe._pipe
    for site in pipe._restore:
        site.remove()
    # Engines built with fused q/k/v projections had the denoiser fused at load; put it back as it was.
    fusion.unfuse(find_denoiser(original)[1])
    object.__setattr__(pipe, "_pipe", None)
    return original
