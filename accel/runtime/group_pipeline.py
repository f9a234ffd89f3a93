"""The hybrid window on ``2k`` ranks: each CFG group pipelines its own branch over ``k`` stages.

Outside the window the hook is the CFG split on the group layout (:class:`CFGSplitHook`: batch split,
sequence parallelism or whole branches; exact). The relative gap between the branches is measured from the
gathered prediction on every rank alike and decides the window (:mod:`accel.runtime.schedule`).

In the window CFG group ``g`` (ranks ``[g k, (g + 1) k)``) runs branch ``g`` with its ``k`` ranks as the
``k`` stages of the plan (stage ``j`` on the group's ``j``-th rank), each on the boundary tensors the other
stages produced at the previous step. Both branches are computed every step, so the pipeline's own guidance
formula runs on a real unconditional and a real conditional prediction: the window is approximate only
through the stale activations, never through guidance (no ``window_guidance`` choice is needed).

The first window step runs each branch whole on every rank of its group: in CFG steps the group's ranks
hold only their share of the activations (rows, or tokens), so this step computes the exact prediction and
captures each rank's stage inputs at once, and it needs no look-ahead of the adaptive rule (the published
code also starts its window with a full forward). The following window steps are pipelined: each rank runs
its stage, posts the boundary tensors it produced to the stages that read them (``batch_isend_irecv`` into
double-buffered receive slots, waited for at the next step), and the two branch predictions, produced by
the rank of each group that owns the last unit, reach every rank through one all-gather.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from accel.models import DenoiserAdapter, TensorEdge, adapt
from accel.partition import stage_owners
from accel.runtime.comm import Communicator
from accel.runtime.guidance import BatchSplit, CFGSplitHook, _batch_of, _map_output, slice_batch
from accel.runtime.pipeline import (
    PREDICTION,
    TAG_BOUNDARY,
    HybridCallStats,
    StepRecord,
    _first_tensor,
    _LazyRates,
    _shape_key,
)
from accel.runtime.schedule import (
    LaggedRates,
    ResolvedSchedule,
    ScheduleSettings,
    earliest_start,
    relative_gap,
)
from accel.runtime.stages import Key, decide_window, run_stage


class _StagePlan(Protocol):
    @property
    def segments(self) -> Sequence[tuple[int, int]]: ...


class StagedPlan(Protocol):
    """What the hook reads from a plan: one entry of unit segments per stage (``accel.plan.Plan`` fits)."""

    @property
    def stages(self) -> Sequence[_StagePlan]: ...


PlanProvider = Callable[[DenoiserAdapter, tuple[Any, ...], dict[str, Any], int], StagedPlan]


class GroupStageExecutor:
    """Runs stage ``stage`` of a ``k``-stage plan of one branch on stale boundary tensors (one per shape).

    Args:
        adapter: the denoiser adapter.
        stages: unit segments ``[lo, hi)`` per stage (from the plan).
        edges: every tensor edge between units at this shape (``adapter.trace``).
        stage: the stage this rank runs.
        peers: the global rank running each stage (this rank's CFG group, in stage order).
        device: where the receive buffers live.
    """

    def __init__(
        self,
        adapter: DenoiserAdapter,
        stages: Sequence[Sequence[tuple[int, int]]],
        edges: Sequence[TensorEdge],
        *,
        stage: int,
        peers: Sequence[int],
        device: torch.device,
    ) -> None:
        if len(peers) != len(stages) or not 0 <= stage < len(stages):
            raise ValueError(
                f"stage {stage} and {len(peers)} peers do not fit a plan of {len(stages)} stages."
            )
        self.adapter = adapter
        self.stage = stage
        self.peers = list(peers)
        n = len(adapter.units)
        self.owner = stage_owners(stages, n)
        self.segments = [sorted((int(lo), int(hi)) for lo, hi in segs) for segs in stages]
        self.all_segments = sorted(seg for segs in self.segments for seg in segs)
        self.edges = list(edges)
        self.last_stage = self.owner[n - 1]
        self._edge = {(e.name, e.producer): e for e in self.edges}
        # Per stage: the boundary tensors it reads, in one order every rank derives alike (message order).
        inputs = [
            list(
                dict.fromkeys(
                    (e.name, e.producer)
                    for e in self.edges
                    if self.owner[e.consumer] == k and self.owner[e.producer] != k
                )
            )
            for k in range(len(stages))
        ]
        self.inputs = inputs[stage]
        self.outgoing = {
            dest: [key for key in inputs[dest] if self.owner[key[1]] == stage]
            for dest in range(len(stages))
            if dest != stage
        }
        self.incoming = {
            src: [key for key in self.inputs if self.owner[key[1]] == src]
            for src in range(len(stages))
            if src != stage
        }
        self.slots: list[dict[Key, torch.Tensor]] = [
            {key: self._empty(key, device) for key in self.inputs} for _ in range(2)
        ]
        self._placeholder: torch.Tensor | None = None
        self._pending: list[Any] = []
        self._keep: list[torch.Tensor] = []

    def _empty(self, key: Key, device: torch.device) -> torch.Tensor:
        e = self._edge[key]
        return torch.empty(e.shape, dtype=getattr(torch, e.dtype), device=device)

    def nbytes(self, key: Key) -> int:
        """Size of boundary tensor ``key`` at this shape."""
        return self._edge[key].nbytes

    def forward_capturing(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, slot: int
    ) -> tuple[Any, list[str]]:
        """The whole denoiser through the adapter (equal to ``model.forward``), keeping copies of this
        stage's input boundary tensors in receive slot ``slot``; returns the output and what was kept."""
        adapter = self.adapter
        wanted = self.slots[slot]
        state = adapter.prepare(*args, **kwargs)
        captured: list[str] = []
        for lo, hi in self.all_segments:
            adapter.run(state, lo, hi)
            named = adapter.state_tensors(state, hi)
            for (name, producer), buf in wanted.items():
                if lo <= producer < hi:
                    buf.copy_(named[name])
                    captured.append(f"{name}@{producer}")
        return adapter.finish(state), captured

    def compute(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, slot: int
    ) -> tuple[Any, dict[Key, torch.Tensor], list[int]]:
        """This stage on slot ``slot``'s inputs: the denoiser output (``None`` unless this stage owns the last
        unit), the boundary tensors produced, and the units run. No communication."""
        adapter = self.adapter
        initial = adapter.prepare(*args, **kwargs)
        state, local, units = run_stage(
            adapter, self.segments[self.stage], self.edges, self.owner, initial, self.slots[slot]
        )
        output = adapter.finish(state) if self.stage == self.last_stage else None
        return output, local, units

    def exchange(self, local: dict[Key, torch.Tensor], *, slot: int) -> list[tuple[str, int]]:
        """Post the sends of this step's boundary tensors and the receives of the next step's inputs (into
        the other slot); they are waited for by the next :meth:`step` or :meth:`drain`. Returns what is sent."""
        ops: list[dist.P2POp] = []
        sent: list[tuple[str, int]] = []
        outgoing: list[torch.Tensor] = []
        for dest, keys in sorted(self.outgoing.items()):
            for key in keys:
                tensor = local[key].contiguous()
                outgoing.append(tensor)
                ops.append(dist.P2POp(dist.isend, tensor, self.peers[dest], None, TAG_BOUNDARY))
                sent.append((f"{key[0]}@{key[1]}", self.nbytes(key)))
        nxt = self.slots[1 - slot]
        for src, keys in sorted(self.incoming.items()):
            for key in keys:
                ops.append(dist.P2POp(dist.irecv, nxt[key], self.peers[src], None, TAG_BOUNDARY))
        if ops:
            self._pending = dist.batch_isend_irecv(ops)
            self._keep = outgoing
        return sent

    def step(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, slot: int, last: bool
    ) -> tuple[Any, list[int], list[tuple[str, int]]]:
        """One pipelined step: wait for this slot's inputs, run the stage, and unless ``last`` exchange the
        boundary tensors for the next step. Returns the output (or ``None``), the units run and what was sent."""
        self.drain()
        output, local, units = self.compute(args, kwargs, slot=slot)
        sent = [] if last else self.exchange(local, slot=slot)
        return output, units, sent

    def placeholder_like(self, prediction: torch.Tensor) -> torch.Tensor:
        """A zero tensor shaped like the branch prediction: what a rank without the last unit contributes
        to the prediction all-gather."""
        p = self._placeholder
        if p is None or p.shape != prediction.shape or p.dtype != prediction.dtype:
            p = self._placeholder = torch.zeros_like(prediction, memory_format=torch.contiguous_format)
        return p

    def drain(self) -> None:
        """Finish every outstanding transfer (before using a slot, at the end of the window or call)."""
        for work in self._pending:
            work.wait()
        self._pending = []
        self._keep = []


class GroupPipelineHook(CFGSplitHook):
    """CFG split on the group layout plus a per-group ``k``-stage pipelined window (module docstring).

    Args:
        comm: the world communicator with its sub-groups (``2k`` ranks, ``k >= 2``).
        owns_result: see :class:`CFGSplitHook`.
        guided: whether the pipeline applies classifier-free guidance in this call.
        num_steps: the number of denoiser calls of the current pipeline call (read at its first call).
        schedule: when to pipeline.
        get_plan: ``(adapter, branch_args, branch_kwargs, rows) -> plan`` with ``k`` stages for one branch
            of ``rows`` rows at this call's shape (the same plan on every rank).
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
        sequence_parallel: bool | None = None,
    ) -> None:
        super().__init__(comm, owns_result, sequence_parallel=sequence_parallel)
        layout = comm.layout
        if layout.group_size < 2:
            raise ValueError(
                f"the group pipeline needs CFG groups of 2 or more ranks (4+ devices), this world has "
                f"{comm.world_size}; on 2 devices use the 2-stage hybrid runtime (HybridHook)."
            )
        self.k = layout.group_size
        self.branch = layout.group_of(comm.rank)
        self.position = comm.rank - self.branch * self.k
        self.guided = guided
        self.num_steps = num_steps
        self.schedule_settings = schedule
        self.get_plan = get_plan
        self.recorder: Callable[[StepRecord], None] | None = None
        self._adapter: DenoiserAdapter | None = None
        self._executors: dict[Any, tuple[StagedPlan, GroupStageExecutor]] = {}
        #: the plan of the latest call's shape (``None`` before one was needed)
        self.plan: StagedPlan | None = None
        self._reset_call()

    # -- per call ----------------------------------------------------------------------------------
    def _reset_call(self) -> None:
        self.stats = HybridCallStats()
        self._rates = LaggedRates()
        self._schedule: ResolvedSchedule | None = None
        self._decided = False
        self._window: tuple[int, int] | None = None
        self._steps_total: int | None = None
        self._executor: GroupStageExecutor | None = None
        self._template: Any = None
        self._measure = False
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

    # -- the hook ----------------------------------------------------------------------------------
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        step = self.calls
        batch = _batch_of(args, kwargs)
        if batch is None or batch % 2 or not self.guided():
            return super().new_forward(module, *args, **kwargs)  # not a 2-branch CFG call
        self._close_phase(time.perf_counter())
        if step == 0 and self._schedule is None:
            self._begin_call(module, args, kwargs, batch)  # may plan: not counted in a phase
        phase = self._decide(step)
        self._phase, self._phase_start = phase, time.perf_counter()
        self.stats.steps[phase] += 1
        if phase == "cfg":
            self._measure = True
            output = super().new_forward(module, *args, **kwargs)
            if self._measure:  # nothing was gathered
                self._measure = False
                self._rates.skip()
            self._record(step, "cfg", list(range(len(self._adapter.units))) if self._adapter else [], [])
            return output
        self.calls += 1
        self.split_calls += 1
        window = self._window
        assert window is not None and self._executor is not None
        branch_args, branch_kwargs = self._branch_inputs(args, kwargs, batch)
        if step == window[0]:
            return self._prime(step, branch_args, branch_kwargs, batch)
        return self._pipelined(step, branch_args, branch_kwargs, batch, last=step == window[1])

    def _gather(self, local: torch.Tensor, split: BatchSplit) -> torch.Tensor:
        full = super()._gather(local, split)
        if self._measure and full is not local:
            # The prediction (the first gathered tensor) measures the branch gap, identically on every rank.
            self._measure = False
            half = split.batch // 2
            self._rates.push(relative_gap(full[:half], full[half:]))
        return full

    def _branch_inputs(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        rows = slice(self.branch * (batch // 2), (self.branch + 1) * (batch // 2))
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
        branch_args, branch_kwargs = self._branch_inputs(args, kwargs, batch)
        key = _shape_key(branch_args, branch_kwargs)
        cached = self._executors.get(key)
        if cached is None:
            start = time.perf_counter()
            plan = self.get_plan(adapter, branch_args, branch_kwargs, batch // 2)
            stages = [list(stage.segments) for stage in plan.stages]
            if len(stages) != self.k:
                raise ValueError(
                    f"the plan has {len(stages)} stages, but each CFG group of {self.k} ranks pipelines its "
                    f"branch over {self.k} stages: make the plan with devices={self.k} "
                    f"(accel plan ... --devices {self.k})."
                )
            with torch.no_grad():
                edges = adapter.trace(*branch_args, **branch_kwargs)
            device = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)).device
            group = self.comm.layout.groups[self.branch]
            executor = GroupStageExecutor(
                adapter, stages, edges, stage=self.position, peers=group, device=device
            )
            cached = self._executors[key] = (plan, executor)
            self.stats.planned_s = time.perf_counter() - start
        self.plan, self._executor = cached

    def _decide(self, step: int) -> str:
        schedule = self._schedule
        if schedule is None or self._executor is None:
            return "cfg"
        if not self._decided:
            decided = decide_window(schedule, _LazyRates(self._rates, step), step, self._steps_total)
            if decided is not None:
                self._decided = True
                self.stats.tau1, self.stats.tau2, self._window = decided
                self.stats.window = self._window
        window = self._window
        return "pipeline" if window is not None and window[0] <= step <= window[1] else "cfg"

    def _prime(self, step: int, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int) -> Any:
        """First window step: the whole branch on every rank of the group, keeping this stage's inputs."""
        executor = self._executor
        assert executor is not None
        executor.drain()
        output, captured = executor.forward_capturing(args, kwargs, slot=(step + 1) % 2)
        self._template = output
        # Every rank of a group holds its branch whole: gather one copy per group, over the stride.
        split = BatchSplit(batch=batch, world_size=self.comm.world_size, parts=2)
        self._measure = True
        result = _map_output(output, lambda local: self._gather(local, split))
        prediction = _first_tensor(output)
        self._record(step, "pipeline", list(range(len(executor.adapter.units))), [], captured)
        self.stats.pipeline_bytes += prediction.numel() * prediction.element_size()
        return result

    def _pipelined(
        self, step: int, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, *, last: bool
    ) -> Any:
        executor = self._executor
        assert executor is not None
        output, units, sent = executor.step(args, kwargs, slot=step % 2, last=last)
        template = _first_tensor(self._template)
        mine = (
            _first_tensor(output).contiguous() if output is not None else executor.placeholder_like(template)
        )
        gathered = self.comm.all_gather(mine)
        # Rank-major: keep the last stage's rank of each group (the others sent zeros).
        owners = [g * self.k + executor.last_stage for g in range(2)]
        full = gathered.view(self.comm.world_size, *mine.shape)[owners].reshape(batch, *mine.shape[1:])
        sent.append((PREDICTION, mine.numel() * mine.element_size()))
        boundary = sum(n for name, n in sent if name != PREDICTION)
        self.comm.stats.bytes_sent += boundary  # the all-gather counted the prediction already
        self.stats.pipeline_bytes += boundary + mine.numel() * mine.element_size()
        self._rates.skip()
        self._record(step, "pipeline", units, sent)
        return _map_output(self._template, lambda _t: full)

    def _record(
        self,
        step: int,
        phase: str,
        units: list[int],
        sent: list[tuple[str, int]],
        captured: Sequence[str] = (),
    ) -> None:
        if self.recorder is not None:
            self.recorder(StepRecord(step, self.comm.rank, phase, tuple(units), tuple(sent), tuple(captured)))
