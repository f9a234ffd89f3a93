"""What the 2-rank and the ``2k``-rank hybrid runtimes share: the per-call bookkeeping of the window.

:class:`WindowHook` is a :class:`CFGSplitHook` that, on a guided 2-branch CFG call, resolves the schedule at
the call's first step, plans and builds a :class:`~accel.runtime.stages.StageExecutor` per shape (compiling
its segments with a compiled backend), decides the window from the measured rates, and times each phase.
Its subclasses say how a window step runs (:class:`accel.runtime.pipeline.HybridHook` on 2 ranks,
:class:`accel.runtime.group_pipeline.GroupPipelineHook` on ``2k`` ranks).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypedDict, TypeVar

import torch
from typing_extensions import NotRequired

from accel.models import DenoiserAdapter, TensorEdge, adapt
from accel.runtime.comm import Communicator
from accel.runtime.guidance import CFGSplitHook, slice_batch
from accel.runtime.schedule import LaggedRates, earliest_start
from accel.runtime.stages import (
    Segment,
    StageExecutor,
    compile_segments,
    decide_window,
    shape_key,
    tensors_of,
)
from accel.settings import ResolvedSchedule, ScheduleSettings

if TYPE_CHECKING:
    from accel.compile.runner import StageRunner


@dataclass(frozen=True)
class StepRecord:
    """What one rank did in one denoiser call (for tests and debugging; see ``WindowHook.recorder``).

    Attributes:
        step: denoiser call index within the pipeline call.
        rank: this rank.
        phase: ``"cfg"`` (whole denoiser on this rank's share) or ``"pipeline"`` (a window step).
        units: unit indices run, in order.
        sent: ``(name, nbytes)`` of every tensor this rank sent in this step.
        captured: boundary tensors kept in this step for the window.
    """

    step: int
    rank: int
    phase: str
    units: tuple[int, ...]
    sent: tuple[tuple[str, int], ...]
    captured: tuple[str, ...] = ()


@dataclass
class HybridCallStats:
    """Per-call numbers of the hybrid runtime (read after the call)."""

    tau1: int | None = None
    tau2: int | None = None
    window: tuple[int, int] | None = None
    steps: dict[str, int] = field(default_factory=lambda: {"cfg": 0, "pipeline": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"cfg": 0.0, "pipeline": 0.0})
    pipeline_bytes: int = 0
    rates: list[float] = field(default_factory=list)
    planned_s: float = 0.0


class _StagePlan(Protocol):
    @property
    def segments(self) -> Sequence[tuple[int, int]]: ...


class StagedPlan(Protocol):
    """What the runtime reads from a plan: one entry of unit segments per stage (``accel.plan.Plan`` fits)."""

    @property
    def stages(self) -> Sequence[_StagePlan]: ...


#: ``(adapter, branch_args, branch_kwargs, rows) -> plan`` for one branch of ``rows`` rows at a call's shape
PlanProvider = Callable[[DenoiserAdapter, tuple[Any, ...], dict[str, Any], int], StagedPlan]


class WindowOptions(TypedDict):
    """The keyword arguments of every window hook (see :class:`WindowHook`)."""

    guided: Callable[[], bool]
    num_steps: Callable[[], int | None]
    schedule: ScheduleSettings
    get_plan: PlanProvider
    runner: NotRequired[StageRunner | None]
    vae_scale_factor: NotRequired[int]
    sequence_parallel: NotRequired[bool | None]


E = TypeVar("E", bound=StageExecutor)


class WindowHook(CFGSplitHook, Generic[E]):
    """CFG split outside the window; the window's schedule, plan, executor and per-call numbers.

    Args:
        comm: the world communicator.
        owns_result: see :class:`CFGSplitHook`.
        guided: whether the pipeline applies classifier-free guidance in this call.
        num_steps: the number of denoiser calls of the current pipeline call (read at its first call).
        schedule: when to pipeline.
        get_plan: the plan of one branch at a call's shape (the same plan on every rank).
        runner: compiled stage callables (``backend`` other than eager): the window's segments run
            through it, under the engine keys ``accel export`` writes.
        vae_scale_factor: pixels per latent, for the engine keys' image size.
        sequence_parallel: see :class:`CFGSplitHook`.

    ``recorder``: set to a callable to receive a :class:`StepRecord` per guided denoiser call (tests).
    """

    def __init__(
        self,
        comm: Communicator,
        owns_result: Callable[[], bool],
        *,
        guided: Callable[[], bool],
        num_steps: Callable[[], int | None],
        schedule: ScheduleSettings,
        get_plan: PlanProvider,
        runner: StageRunner | None = None,
        vae_scale_factor: int = 8,
        sequence_parallel: bool | None = None,
    ) -> None:
        self._check_world(comm)
        super().__init__(comm, owns_result, sequence_parallel=sequence_parallel)
        self.guided = guided
        self.num_steps = num_steps
        self.schedule_settings = schedule
        self.get_plan = get_plan
        self.runner = runner
        self.vae_scale_factor = vae_scale_factor
        #: the guidance branch this rank runs in CFG steps (0: unconditional, 1: conditional)
        self.branch = comm.layout.group_of(comm.rank)
        self.recorder: Callable[[StepRecord], None] | None = None
        self._adapter: DenoiserAdapter | None = None
        self._executors: dict[Any, tuple[StagedPlan, E]] = {}
        #: the plan of the latest call's shape (``None`` before one was needed)
        self.plan: StagedPlan | None = None
        self._reset_call()

    def _check_world(self, comm: Communicator) -> None:
        """Refuse a world this runtime does not run on (a ``ValueError`` naming the runtime that does)."""

    # -- per call ----------------------------------------------------------------------------------
    def _reset_call(self) -> None:
        self.stats = HybridCallStats()
        self._rates = LaggedRates()
        self._schedule: ResolvedSchedule | None = None
        self._decided = False
        self._window: tuple[int, int] | None = None
        self._steps_total: int | None = None
        self._executor: E | None = None
        self._template: Any = None
        self._phase_start: float | None = None
        self._phase = "cfg"

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        super().reset_state(module)
        if self._executor is not None:
            self._executor.drain()
        self._reset_call()
        return module

    def end_call(self) -> HybridCallStats:
        """Finish outstanding transfers and fill in the per-call numbers (after the pipeline call)."""
        if self._executor is not None:
            self._executor.drain()
        self._close_phase(time.perf_counter())
        self.stats.rates = self._rates.values()
        return self.stats

    def _close_phase(self, now: float) -> None:
        if self._phase_start is not None:
            self.stats.seconds[self._phase] += now - self._phase_start
        self._phase_start = None

    # -- every guided step -------------------------------------------------------------------------
    def _windowed(self, batch: int | None) -> bool:
        """Whether a denoiser call of ``batch`` rows is a 2-branch CFG call (one the window may take)."""
        return batch is not None and batch % 2 == 0 and self.guided()

    def _enter(
        self, step: int, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int
    ) -> str:
        """Close the previous step's phase, set the call up at its first step (planning is counted in no
        phase), and open this step's phase: ``"cfg"`` or ``"pipeline"``."""
        self._close_phase(time.perf_counter())
        if step == 0 and self._schedule is None:
            self._begin_call(module, args, kwargs, batch)
        now = time.perf_counter()
        phase = self._decide(step)
        self._phase, self._phase_start = phase, now
        self.stats.steps[phase] += 1
        return phase

    def _branch_inputs(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, branch: int
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The inputs of guidance branch ``branch`` (0: the first ``batch / 2`` rows, 1: the others)."""
        rows = slice(branch * (batch // 2), (branch + 1) * (batch // 2))
        return slice_batch(args, batch, rows), slice_batch(kwargs, batch, rows)

    def _begin_call(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int
    ) -> None:
        if self._adapter is None:
            self._adapter = adapt(module)
        adapter = self._adapter
        self._schedule = self.schedule_settings.resolve(adapter.family)
        self._steps_total = self.num_steps()
        first = earliest_start(self._schedule)
        if first is None or (self._steps_total is not None and first > self._steps_total - 1):
            return  # no window possible in this call: CFG split only, nothing to plan
        b_args, b_kwargs = self._branch_inputs(args, kwargs, batch, self.branch)
        key = shape_key(b_args, b_kwargs)
        cached = self._executors.get(key)
        if cached is None:
            start = time.perf_counter()
            rows = batch // 2
            plan = self.get_plan(adapter, b_args, b_kwargs, rows)
            stages = [list(stage.segments) for stage in plan.stages]
            with torch.no_grad():
                edges = adapter.trace(*b_args, **b_kwargs)
            device = tensors_of(b_args, b_kwargs)[0].device
            executor = self._make_executor(adapter, stages, edges, device)
            if self.runner is not None:
                executor.compiled.update(
                    compile_segments(
                        self.runner,
                        adapter,
                        executor.segments,
                        b_args,
                        b_kwargs,
                        batch=rows,
                        vae_scale_factor=self.vae_scale_factor,
                    )
                )
            cached = self._executors[key] = (plan, executor)
            self.stats.planned_s = time.perf_counter() - start
        self.plan, self._executor = cached

    def _make_executor(
        self,
        adapter: DenoiserAdapter,
        stages: list[list[Segment]],
        edges: Sequence[TensorEdge],
        device: torch.device,
    ) -> E:
        """This rank's executor for a plan of ``stages`` (refusing a plan of the wrong stage count)."""
        raise NotImplementedError

    def _decide(self, step: int) -> str:
        schedule = self._schedule
        if schedule is None or self._executor is None:
            return "cfg"
        if not self._decided:
            decided = decide_window(schedule, _LazyRates(self._rates, step), step, self._steps_total)
            if decided is not None:
                self._decided = True
                self.stats.tau1, self.stats.tau2, window = decided
                self._window = self.stats.window = self._check_start(window, step)
        window = self._window
        return "pipeline" if window is not None and window[0] <= step <= window[1] else "cfg"

    def _check_start(self, window: tuple[int, int] | None, step: int) -> tuple[int, int] | None:
        """The window decided at ``step``, or ``None`` where it cannot start as decided."""
        return window

    def _record(
        self,
        step: int,
        phase: str,
        units: Sequence[int],
        sent: Sequence[tuple[str, int]],
        captured: Sequence[str] = (),
    ) -> None:
        if self.recorder is not None:
            self.recorder(StepRecord(step, self.comm.rank, phase, tuple(units), tuple(sent), tuple(captured)))

    def _all_units(self) -> list[int]:
        return list(range(len(self._adapter.units))) if self._adapter is not None else []


class _LazyRates(Sequence[float]):
    """The rates of steps ``0 .. n-1`` read on demand (each read waits only for that step's copy)."""

    def __init__(self, rates: LaggedRates, n: int) -> None:
        self._rates = rates
        self._n = min(n, len(rates))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._rates.value(i)
