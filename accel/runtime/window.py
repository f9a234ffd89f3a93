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

from accel.models import DenoiserAdapter, InputShape, TensorEdge, adapt
from accel.runtime.comm import Communicator
from accel.runtime.guidance import CFGSplitHook, SplitState, _batch_of, slice_batch
from accel.runtime.schedule import LaggedRates, earliest_start
from accel.runtime.stages import (
    Segment,
    StageExecutor,
    call_key,
    compile_segments,
    decide_window,
    tensors_of,
)
from accel.settings import ResolvedSchedule, ScheduleSettings

if TYPE_CHECKING:
    from accel.compile.runner import StageRunner


@dataclass(frozen=True)
class StepRecord:
    """What one rank did in one step's 2-branch CFG call (for tests and debugging; see ``WindowHook.recorder``).

    Attributes:
        step: pipeline step index within the pipeline call.
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
    split_problem: NotRequired[Callable[[], str | None] | None]


E = TypeVar("E", bound=StageExecutor)


@dataclass
class WindowState(SplitState, Generic[E]):
    """Per-call state of a window hook (``reset`` at every pipeline call).

    Attributes:
        stats: the numbers reported after the call.
        rates: the branch gaps measured so far (read one step late).
        schedule: the schedule resolved at the call's first step (``None``: not yet, or no window).
        decided: whether the window was decided; ``window``: its ``(start, end)`` steps, if any.
        steps_total: the call's number of steps, when the pipeline says.
        step: the index of the next pipeline step.
        step_call: the batch and the keyword arguments (those not ``None``) of the call's first denoiser
            call: a later call like it begins the next step, any other (skip-layer guidance's extra call
            on the conditional rows) belongs to the current one.
        executor: the executor of the call's shape (``None``: no window possible).
        template: an output of the denoiser, to give window steps' predictions the same structure.
        phase, phase_start: the phase of the current step and when it began.
    """

    stats: HybridCallStats = field(default_factory=HybridCallStats)
    rates: LaggedRates = field(default_factory=LaggedRates)
    schedule: ResolvedSchedule | None = None
    decided: bool = False
    window: tuple[int, int] | None = None
    steps_total: int | None = None
    step: int = 0
    step_call: tuple[int | None, frozenset[str]] | None = None
    executor: E | None = None
    template: Any = None
    phase: str = "cfg"
    phase_start: float | None = None


class WindowHook(CFGSplitHook, Generic[E]):
    """CFG split outside the window; the window's schedule, plan, executor and per-call numbers.

    Args:
        comm: the world communicator.
        owns_result: see :class:`CFGSplitHook`.
        guided: whether the pipeline applies classifier-free guidance in this call.
        num_steps: the number of steps of the current pipeline call (read at its first call).
        schedule: when to pipeline.
        get_plan: the plan of one branch at a call's shape (the same plan on every rank).
        runner: compiled stage callables (``backend`` other than eager): the window's segments run
            through it, under the engine keys ``accel export`` writes.
        vae_scale_factor: pixels per latent, for the engine keys' image size.
        sequence_parallel, split_problem: see :class:`CFGSplitHook`.

    A step of the schedule is a pipeline step, not a denoiser call: a pipeline that calls the denoiser
    more than once per step (SD3's skip-layer guidance adds a call on the conditional rows) has its extra
    calls run exactly (:meth:`_split_forward`), outside the schedule, the rates and the window.

    ``recorder``: set to a callable to receive a :class:`StepRecord` per guided denoiser call (tests).
    """

    State: type[SplitState] = WindowState
    state: WindowState[E]

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
        split_problem: Callable[[], str | None] | None = None,
    ) -> None:
        self._check_world(comm)
        super().__init__(comm, owns_result, sequence_parallel=sequence_parallel, split_problem=split_problem)
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

    def _check_world(self, comm: Communicator) -> None:
        """Refuse a world this runtime does not run on (a ``ValueError`` naming the runtime that does)."""

    # -- per call ----------------------------------------------------------------------------------
    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.state.executor is not None:
            self.state.executor.drain()
        return super().reset_state(module)

    def end_call(self) -> HybridCallStats:
        """Finish outstanding transfers and fill in the per-call numbers (after the pipeline call)."""
        if self.state.executor is not None:
            self.state.executor.drain()
        self._close_phase(time.perf_counter())
        self.state.stats.rates = self.state.rates.values()
        return self.state.stats

    def _close_phase(self, now: float) -> None:
        if self.state.phase_start is not None:
            self.state.stats.seconds[self.state.phase] += now - self.state.phase_start
        self.state.phase_start = None

    # -- every guided step -------------------------------------------------------------------------
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        batch = _batch_of(args, kwargs)
        if not self._starts_step(batch, kwargs):
            return self._split_forward(args, kwargs)  # another call of the current step: exact
        step = self.state.step
        self.state.step += 1
        if batch is None or batch % 2 or not self.guided() or self.split_problem() is not None:
            return self._split_forward(args, kwargs)  # not a 2-branch CFG call
        return self._guided_call(module, args, kwargs, batch, step)

    def _starts_step(self, batch: int | None, kwargs: dict[str, Any]) -> bool:
        """Whether this denoiser call begins a pipeline step (see ``WindowState.step_call``)."""
        keys = frozenset(k for k, v in kwargs.items() if v is not None)
        first = self.state.step_call
        if first is None:
            self.state.step_call = (batch, keys)
            return True
        return batch == first[0] and keys <= first[1]

    def _guided_call(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, step: int
    ) -> Any:
        """Pipeline step ``step``'s 2-branch CFG call of ``batch`` rows: a CFG step or a window step."""
        raise NotImplementedError

    def _enter(
        self, step: int, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int
    ) -> str:
        """Close the previous step's phase, set the call up at its first step (planning is counted in no
        phase), and open this step's phase: ``"cfg"`` or ``"pipeline"``."""
        self._close_phase(time.perf_counter())
        if step == 0 and self.state.schedule is None:
            self._begin_call(module, args, kwargs, batch)
        now = time.perf_counter()
        phase = self._decide(step)
        self.state.phase, self.state.phase_start = phase, now
        self.state.stats.steps[phase] += 1
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
        self.state.steps_total = self.num_steps()
        self.state.schedule = self.schedule_settings.resolve(adapter.family, self.state.steps_total)
        first = earliest_start(self.state.schedule)
        if first is None or (self.state.steps_total is not None and first > self.state.steps_total - 1):
            return  # no window possible in this call: CFG split only, nothing to plan
        b_args, b_kwargs = self._branch_inputs(args, kwargs, batch, self.branch)
        key = call_key(b_args, b_kwargs)
        cached = self._executors.get(key)
        if cached is None:
            start = time.perf_counter()
            rows = batch // 2
            plan = self.get_plan(adapter, b_args, b_kwargs, rows)
            stages = [list(stage.segments) for stage in plan.stages]
            wanted = self.comm.layout.window_stages
            if len(stages) != wanted:
                raise ValueError(
                    f"the plan has {len(stages)} stages, but on {self.comm.world_size} devices the window "
                    f"pipelines each guidance branch over {wanted} stages: make the plan with "
                    f"devices={wanted} (accel plan ... --devices {wanted})."
                )
            with torch.no_grad():
                edges = adapter.trace(*b_args, **b_kwargs)
            device = tensors_of(b_args, b_kwargs)[0].device
            executor = self._make_executor(adapter, stages, edges, device)
            if self.runner is not None:
                shape = InputShape.of_latents(tensors_of(b_args, b_kwargs)[0], self.vae_scale_factor)
                executor.compiled.update(
                    compile_segments(self.runner, adapter, executor.segments, b_args, b_kwargs, shape)
                )
            cached = self._executors[key] = (plan, executor)
            self.state.stats.planned_s = time.perf_counter() - start
        self.plan, self.state.executor = cached

    def _make_executor(
        self,
        adapter: DenoiserAdapter,
        stages: list[list[Segment]],
        edges: Sequence[TensorEdge],
        device: torch.device,
    ) -> E:
        """This rank's executor for a plan of ``stages`` (as many as ``comm.layout.window_stages``)."""
        raise NotImplementedError

    def _decide(self, step: int) -> str:
        schedule = self.state.schedule
        if schedule is None or self.state.executor is None:
            return "cfg"
        if not self.state.decided:
            decided = decide_window(
                schedule, _LazyRates(self.state.rates, step), step, self.state.steps_total
            )
            if decided is not None:
                self.state.decided = True
                self.state.stats.tau1, self.state.stats.tau2, window = decided
                self.state.window = self.state.stats.window = self._check_start(window, step)
        window = self.state.window
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
