"""The hybrid runtime: CFG split outside the window, a stale-activation 2-stage pipeline inside it.

Outside the window every rank runs the whole denoiser on its guidance branch (rank 0 unconditional,
rank 1 conditional) and the prediction is all-gathered, exactly as :class:`CFGSplitHook` does. The
relative gap between the branches is measured from the gathered prediction on every rank alike (no extra
collective) and read one step later to decide the window (:mod:`accel.runtime.schedule`).

Inside the window rank ``k`` runs only plan stage ``k``'s unit segments, on the boundary tensors the
other stage produced at the previous step. Only the plan's boundary tensors move (``batch_isend_irecv``
into preallocated, double-buffered receive buffers), plus the prediction, which the owner of the last
unit sends so that every rank applies guidance and the scheduler step itself (latents stay identical).
The window starts from boundary tensors captured during the last CFG step (through the adapter's
segmented forward, which equals ``model.forward`` bit for bit), so no priming forward is needed.

Window guidance (``window_guidance``):

- ``reference``: the published behaviour. Stage inputs carry the conditioning each rank holds (rank 0
  unconditional, rank 1 conditional); the last stage's output is returned for both branches, so the
  pipeline's guidance formula yields it unchanged (guidance dropped).
- ``cached``: both stages run the conditional branch; the last measured ``d = eps_c - eps_u`` is
  re-applied by returning ``[eps_c - d, eps_c]``, so the pipeline computes ``eps_c + (g - 1) d``.
- ``off``: both stages run the conditional branch; ``[eps_c, eps_c]`` (no guidance).

On CUDA the transfers are NCCL point-to-point operations, which run on NCCL's own stream: the boundary
exchange issued at the end of step ``t`` is waited for only when step ``t + 1`` needs it (the compute
stream waits, the host does not), so it overlaps the pipeline's guidance and scheduler work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from accel.models import DenoiserAdapter, TensorEdge, adapt
from accel.runtime.comm import Communicator
from accel.runtime.guidance import BatchSplit, CFGSplitHook, _batch_of, _map_output, slice_batch
from accel.runtime.schedule import (
    LaggedRates,
    ResolvedSchedule,
    ScheduleSettings,
    clamp_window,
    earliest_start,
    relative_gap,
    taus,
)

if TYPE_CHECKING:
    from accel.compile.runner import StageRunner

log = logging.getLogger(__name__)

PREDICTION = "prediction"
# Message tags (gloo matches by peer and tag; NCCL ignores tags and keeps the issue order on both ranks).
TAG_BOUNDARY, TAG_PREDICTION, TAG_HANDOVER = 1, 2, 3
Key = tuple[str, int]  # (tensor name, producer unit): unique per step


@dataclass(frozen=True)
class StepRecord:
    """What one rank did in one denoiser call (for tests and debugging; see ``HybridHook.recorder``).

    Attributes:
        step: denoiser call index within the pipeline call.
        rank: this rank.
        phase: ``"cfg"`` (whole denoiser on this rank's branch) or ``"pipeline"`` (this rank's stage).
        units: unit indices run, in order.
        sent: ``(name, nbytes)`` of every tensor this rank sent in this step.
        captured: boundary tensors kept from this CFG step for the window.
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


class StageExecutor:
    """Runs one plan stage of a 2-stage pipeline on stale boundary tensors (one per shape).

    Args:
        adapter: the denoiser adapter.
        stages: unit segments ``[lo, hi)`` per stage (from the plan).
        edges: every tensor edge between units at this shape (``adapter.trace``).
        rank: this rank; ``peer`` is the other one. Rank 1 (the conditional branch in CFG steps) runs the
            stage that owns the last unit, rank 0 the other (``stage``, ``peer_stage``).
        device: where the buffers live.
    """

    def __init__(
        self,
        adapter: DenoiserAdapter,
        stages: Sequence[Sequence[tuple[int, int]]],
        edges: Sequence[TensorEdge],
        *,
        rank: int,
        device: torch.device,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if len(stages) != 2:
            raise ValueError(f"the stage executor runs 2 stages, the plan has {len(stages)}.")
        self.adapter = adapter
        self.rank = rank
        self.peer = 1 - rank
        self.group = group
        n = len(adapter.units)
        owner = [-1] * n
        for k, segs in enumerate(stages):
            for lo, hi in segs:
                for i in range(lo, hi):
                    owner[i] = k
        if -1 in owner:
            raise ValueError(f"unit {owner.index(-1)} is in no stage.")
        self.owner = owner
        self.segments = [sorted((int(lo), int(hi)) for lo, hi in segs) for segs in stages]
        self.all_segments = sorted((lo, hi) for segs in self.segments for lo, hi in segs)
        self.edges = list(edges)
        self.last_stage = owner[n - 1]
        # The conditional rank (1) runs the stage that produces the prediction, as in the published code
        # (later stages conditional, earlier ones unconditional; for an onion the outer stage is "later").
        self.stage = self.last_stage if rank == 1 else 1 - self.last_stage
        self.peer_stage = 1 - self.stage
        self._shape = {(e.name, e.producer): e for e in self.edges}
        # Per stage k: the boundary tensors it receives, in one fixed order both ranks agree on.
        self.inputs: list[list[Key]] = [
            [(e.name, e.producer) for e in self.edges if owner[e.consumer] == k and owner[e.producer] != k]
            for k in range(2)
        ]
        self.inputs = [list(dict.fromkeys(keys)) for keys in self.inputs]
        self.boundary_bytes = [sum(self._shape[key].nbytes for key in keys) for keys in self.inputs]
        self.device = device
        dtype_of = {e.dtype: getattr(torch, e.dtype) for e in self.edges}
        # Double-buffered receive slots for this stage's inputs (slot = step % 2).
        self.slots: list[dict[Key, torch.Tensor]] = [
            {
                key: torch.empty(
                    self._shape[key].shape, dtype=dtype_of[self._shape[key].dtype], device=device
                )
                for key in self.inputs[self.stage]
            }
            for _ in range(2)
        ]
        self.handover: dict[Key, torch.Tensor] = {}
        self._prediction: torch.Tensor | None = None
        #: compiled callables of this rank's segments, ``(lo, hi) -> (stage module, callable)``
        self.compiled: dict[tuple[int, int], tuple[Any, Callable[..., Any]]] = {}
        self._pending: list[Any] = []  # boundary works of the previous step (waited before use)
        self._keep: list[torch.Tensor] = []  # tensors being sent (kept alive until their works finish)

    # -- CFG steps ---------------------------------------------------------------------------------
    def forward_capturing(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, slot: int, own: bool, for_peer: bool
    ) -> tuple[Any, list[str]]:
        """The whole denoiser through the adapter (bit-identical to ``model.forward``), keeping copies of
        this stage's input boundary tensors in receive slot ``slot`` (with ``own``) and of the peer's input
        boundary tensors (with ``for_peer``, to hand over when the window starts)."""
        adapter = self.adapter
        wanted: dict[Key, torch.Tensor] = dict(self.slots[slot]) if own else {}
        if for_peer:
            for key in self.inputs[self.peer_stage]:
                if key not in self.handover:
                    e = self._shape[key]
                    self.handover[key] = torch.empty(
                        e.shape, dtype=getattr(torch, e.dtype), device=self.device
                    )
            wanted.update({key: self.handover[key] for key in self.inputs[self.peer_stage]})
        state = adapter.prepare(*args, **kwargs)
        captured: list[str] = []
        for lo, hi in self.all_segments:
            compiled = self.compiled.get((lo, hi))
            if compiled is None:
                adapter.run(state, lo, hi)
            else:
                module, fn = compiled
                state = module.run_state(fn, state)
            named = adapter.state_tensors(state, hi)
            for key, buf in wanted.items():
                name, producer = key
                if lo <= producer < hi:
                    buf.copy_(named[name])
                    captured.append(f"{name}@{producer}")
        return adapter.finish(state), captured

    # -- window steps ------------------------------------------------------------------------------
    def start_window(self, *, slot: int, handover: bool) -> int:
        """Called in the first window step; with ``handover`` the conditional rank (1) sends the inputs of
        rank 0's stage captured on its branch (rank 0 captured none). Returns the bytes sent."""
        self.drain()
        keys = self.inputs[self.stage if self.rank == 0 else self.peer_stage]
        if not handover or not keys:
            return 0
        ops = []
        sent = 0
        if self.rank == 1:
            for key in keys:
                ops.append(dist.P2POp(dist.isend, self.handover[key], 0, self.group, TAG_HANDOVER))
                sent += self._shape[key].nbytes
        else:
            for key in keys:
                ops.append(dist.P2POp(dist.irecv, self.slots[slot][key], 1, self.group, TAG_HANDOVER))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return sent

    def step(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, slot: int, last: bool
    ) -> tuple[torch.Tensor, list[int], list[tuple[str, int]]]:
        """One pipelined step: this rank's stage on slot ``slot``'s inputs; returns the prediction (every
        rank), the units run and what was sent. Unless ``last``, the boundary tensors produced now are
        exchanged into the other slot for the next step."""
        adapter = self.adapter
        self._wait_pending()
        received = self.slots[slot]
        initial = adapter.prepare(*args, **kwargs)
        context = initial.context
        local: dict[Key, torch.Tensor] = {}
        units: list[int] = []
        state = initial
        mine = self.segments[self.stage]
        for lo, hi in mine:
            tensors: dict[str, torch.Tensor] = {}
            if lo == 0:
                tensors.update(adapter.state_tensors(initial, 0))
            for e in self.edges:
                if lo <= e.consumer < hi and e.producer < lo:
                    key = (e.name, e.producer)
                    tensors[e.name] = local[key] if self.owner[e.producer] == self.stage else received[key]
            before = adapter.with_tensors(context, tensors, lo)
            compiled = self.compiled.get((lo, hi))
            if compiled is None:
                state = adapter.run(before, lo, hi)
            else:
                module, fn = compiled
                state = module.run_state(fn, before)
            units.extend(range(lo, hi))
            named = adapter.state_tensors(state, hi)
            for e in self.edges:
                if lo <= e.producer < hi <= e.consumer:
                    local[(e.name, e.producer)] = named[e.name]
        sent: list[tuple[str, int]] = []
        if not last:
            ops = []
            outgoing = [local[key].contiguous() for key in self.inputs[self.peer_stage]]
            for key, tensor in zip(self.inputs[self.peer_stage], outgoing, strict=True):
                ops.append(dist.P2POp(dist.isend, tensor, self.peer, self.group, TAG_BOUNDARY))
                sent.append((f"{key[0]}@{key[1]}", self._shape[key].nbytes))
            nxt = self.slots[1 - slot]
            for key in self.inputs[self.stage]:
                ops.append(dist.P2POp(dist.irecv, nxt[key], self.peer, self.group, TAG_BOUNDARY))
            if ops:
                self._pending = dist.batch_isend_irecv(ops)
                self._keep = outgoing
        if self.last_stage == self.stage:
            prediction = _first_tensor(adapter.finish(state)).contiguous()
            _wait(dist.isend(prediction, self.peer, self.group, tag=TAG_PREDICTION))
            sent.append((PREDICTION, prediction.numel() * prediction.element_size()))
        else:
            buffer = self._prediction
            if buffer is None:
                raise RuntimeError("set_prediction_like() must run before the first pipelined step.")
            _wait(dist.irecv(buffer, self.peer, self.group, tag=TAG_PREDICTION))
            prediction = buffer.clone()  # the buffer is reused next step
        return prediction, units, sent

    def set_prediction_like(self, local: torch.Tensor) -> None:
        """Size the prediction receive buffer from a CFG step's local prediction."""
        p = self._prediction
        if p is None or p.shape != local.shape or p.dtype != local.dtype:
            self._prediction = torch.empty_like(local, memory_format=torch.contiguous_format)

    def _wait_pending(self) -> None:
        for work in self._pending:
            work.wait()
        self._pending = []
        self._keep = []

    def drain(self) -> None:
        """Finish every outstanding transfer (end of window or call)."""
        self._wait_pending()


def _wait(work: Any) -> None:
    if work is not None:
        work.wait()


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return _first_tensor(output[0])
    values = output.values() if hasattr(output, "values") else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no tensor in the denoiser output {type(output).__name__}.")


PlanProvider = Callable[[DenoiserAdapter, tuple[Any, ...], dict[str, Any], int], Any]


class HybridHook(CFGSplitHook):
    """CFG split plus the pipelined window (see the module docstring); world size 2.

    Args:
        comm: the communicator (2 ranks).
        owns_result: see :class:`CFGSplitHook`.
        guided: whether the pipeline applies classifier-free guidance in this call.
        num_steps: the number of denoiser calls of the current pipeline call (read at its first call).
        schedule: when to pipeline.
        window_guidance: ``"reference"``, ``"cached"`` or ``"off"``.
        get_plan: ``(adapter, branch_args, branch_kwargs, batch) -> Plan`` for this call's shape (the same
            plan on every rank).
        runner: compiled stage callables (``backend`` other than eager): this rank's window segments run
            through it, under the engine keys ``accel export`` writes.
        vae_scale_factor: pixels per latent, for the engine keys' image size.

    ``recorder``: set to a callable to receive a :class:`StepRecord` per denoiser call (tests).
    """

    def __init__(
        self,
        comm: Communicator,
        owns_result: Callable[[], bool],
        *,
        guided: Callable[[], bool],
        num_steps: Callable[[], int | None],
        schedule: ScheduleSettings,
        window_guidance: str,
        get_plan: PlanProvider,
        runner: StageRunner | None = None,
        vae_scale_factor: int = 8,
    ) -> None:
        super().__init__(comm, owns_result)
        self.runner = runner
        self.vae_scale_factor = vae_scale_factor
        if comm.world_size != 2:
            raise ValueError(f"the hybrid runtime runs on 2 ranks, not {comm.world_size}.")
        self.guided = guided
        self.num_steps = num_steps
        self.schedule_settings = schedule
        self.window_guidance = window_guidance
        self.get_plan = get_plan
        self.recorder: Callable[[StepRecord], None] | None = None
        self._adapter: DenoiserAdapter | None = None
        self._executors: dict[Any, tuple[Any, StageExecutor]] = {}
        #: the plan of the latest call's shape (``None`` before one was needed)
        self.plan: Any = None
        self._reset_call()

    # -- per call ----------------------------------------------------------------------------------
    def _reset_call(self) -> None:
        self.stats = HybridCallStats()
        self._rates = LaggedRates()
        self._schedule: ResolvedSchedule | None = None
        self._decided = False
        self._window: tuple[int, int] | None = None
        self._steps_total: int | None = None
        self._executor: StageExecutor | None = None
        self._template: Any = None
        self._delta: torch.Tensor | None = None
        self._captured_at: int | None = None
        self._phase_start: float | None = None
        self._phase: str = "cfg"

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
        forward = self.fn_ref.original_forward
        assert forward is not None, "the hook registry sets original_forward for hooks with new_forward"
        step = self.calls
        self.calls += 1
        batch = _batch_of(args, kwargs)
        split = self.split_for(batch) if batch is not None else None
        if batch is None or split is None or split.parts != 2 or not self.guided():
            # Not a 2-branch CFG call: behave exactly like the CFG split hook.
            self.calls -= 1
            return super().new_forward(module, *args, **kwargs)
        self._close_phase(time.perf_counter())
        if step == 0 and self._schedule is None:
            self._begin_call(module, args, kwargs, batch, split)  # may plan: not counted in a phase
        now = time.perf_counter()
        phase = self._decide(step)
        self._phase, self._phase_start = phase, now
        self.stats.steps[phase] += 1
        if phase == "pipeline":
            return self._pipelined(step, args, kwargs, batch, split)
        return self._cfg_step(step, forward, args, kwargs, batch, split)

    def _begin_call(
        self,
        module: torch.nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        batch: int,
        split: BatchSplit,
    ) -> None:
        if self._adapter is None:
            self._adapter = adapt(module)
        adapter = self._adapter
        self._schedule = self.schedule_settings.resolve(adapter.family)
        self._steps_total = self.num_steps()
        first = earliest_start(self._schedule)
        if first is None or (self._steps_total is not None and first > self._steps_total - 1):
            return  # no window possible in this call: CFG split only, nothing to plan
        rows = split.rows_of(self.comm.rank)
        b_args, b_kwargs = slice_batch(args, batch, rows), slice_batch(kwargs, batch, rows)
        key = _shape_key(b_args, b_kwargs)
        cached = self._executors.get(key)
        if cached is None:
            start = time.perf_counter()
            plan = self.get_plan(adapter, b_args, b_kwargs, split.rows)
            with torch.no_grad():
                edges = adapter.trace(*b_args, **b_kwargs)
            device = _tensors(b_args, b_kwargs)[0].device
            stages = [list(stage.segments) for stage in plan.stages]
            executor = StageExecutor(
                adapter, stages, edges, rank=self.comm.rank, device=device, group=self.comm.group
            )
            if self.runner is not None:
                self._compile_segments(executor, b_args, b_kwargs, split.rows)
            cached = self._executors[key] = (plan, executor)
            self.stats.planned_s = time.perf_counter() - start
        self.plan, self._executor = cached

    def _compile_segments(
        self, executor: StageExecutor, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int
    ) -> None:
        """Compiled callables for every window segment (keys as ``accel export`` names them): this
        rank's stage runs its own in the window, and the CFG step that captures the window's starting
        activations runs them all in unit order, so that it is as fast as a compiled CFG step."""
        from accel.compile.stage import build_stage

        assert self.runner is not None and self._adapter is not None
        sample = _tensors(args, kwargs)[0]
        scale = self.vae_scale_factor
        bucket = f"{sample.shape[-2] * scale}x{sample.shape[-1] * scale}.b{batch}"
        for k, segments in enumerate(executor.segments):
            for lo, hi in segments:
                key = f"window.s{k}.u{lo}-{hi}.{bucket}"
                with torch.no_grad():
                    module, inputs = build_stage(self._adapter, lo, hi, args, kwargs)
                fn = self.runner.get(key, module, inputs, cache_key=(key, _shape_key(args, kwargs)))
                executor.compiled[(lo, hi)] = (module, fn)

    def _decide(self, step: int) -> str:
        schedule = self._schedule
        if schedule is None or self._executor is None:
            return "cfg"
        if not self._decided:
            lazy = _LazyRates(self._rates, step)
            found = taus(schedule, lazy)
            if found is not None:
                self._decided = True
                total = self._steps_total if self._steps_total is not None else 2**31
                # "always" has no tau2 of its own: report the last step it pipelines.
                tau2 = found[1] if schedule.mode != "always" else max(found[0], total - 1)
                self.stats.tau1, self.stats.tau2 = found[0], tau2
                self._window = clamp_window(found[0], found[1], total)
                if (
                    self._window is not None
                    and self._window[0] <= step
                    and self._captured_at != self._window[0] - 1
                ):
                    # No activations were captured for this start (cannot happen with the rules here).
                    log.warning("no activations captured before step %d: the window is skipped", step)
                    self._window = None
                self.stats.window = self._window
        window = self._window
        if window is not None and window[0] <= step <= window[1]:
            return "pipeline"
        return "cfg"

    def _capture_now(self, step: int) -> bool:
        """Whether this CFG step may be the last one before the window (its activations start it)."""
        schedule = self._schedule
        if schedule is None or self._executor is None:
            return False
        total = self._steps_total if self._steps_total is not None else 2**31
        if step + 1 > total - 1:
            return False
        if self._decided:
            return self._window is not None and step == self._window[0] - 1
        if schedule.mode == "adaptive":
            return (step >= schedule.lookback or step == schedule.tau_cap) and step <= schedule.tau_cap
        return False

    def _cfg_step(
        self,
        step: int,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        batch: int,
        split: BatchSplit,
    ) -> Any:
        rows = split.rows_of(self.comm.rank)
        b_args, b_kwargs = slice_batch(args, batch, rows), slice_batch(kwargs, batch, rows)
        executor = self._executor
        captured: list[str] = []
        if executor is not None and self._capture_now(step):
            # reference: each rank starts from its own branch; cached/off: both stages run the conditional
            # branch, so the conditional rank (1) also keeps stage 0's inputs and hands them over.
            handover = self.window_guidance != "reference"
            for_peer = handover and self.comm.rank == 1
            own = not (handover and self.comm.rank == 0)
            output, captured = executor.forward_capturing(
                b_args, b_kwargs, slot=(step + 1) % 2, own=own, for_peer=for_peer
            )
            self._captured_at = step
            self._template = output
            executor.set_prediction_like(_first_tensor(output))
        else:
            output = forward(*b_args, **b_kwargs)
        self.split_calls += 1
        capture = self._captured_at == step
        sent: list[tuple[str, int]] = []

        def gather(local: torch.Tensor) -> torch.Tensor:
            full = self._gather(local, split)
            if full is local:
                return full
            sent.append((PREDICTION, local.numel() * local.element_size()))
            if len(sent) == 1:  # the prediction (the first gathered tensor) measures the branch gap
                uncond, cond = full[: split.rows], full[split.rows :]
                self._rates.push(relative_gap(uncond, cond))
                if capture and self.window_guidance == "cached":
                    self._delta = cond - uncond
            return full

        result = _map_output(output, gather)
        if not sent:
            self._rates.skip()
        if self.recorder is not None:
            n = len(self._adapter.units) if self._adapter is not None else 0
            self.recorder(
                StepRecord(step, self.comm.rank, "cfg", tuple(range(n)), tuple(sent), tuple(captured))
            )
        return result

    def _pipelined(
        self, step: int, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, split: BatchSplit
    ) -> Any:
        executor = self._executor
        window = self._window
        assert executor is not None and window is not None
        mode = self.window_guidance
        branch = self.comm.rank if mode == "reference" else 1  # rank 0 uncond, rank 1 cond (reference)
        rows = split.rows_of(branch)
        b_args, b_kwargs = slice_batch(args, batch, rows), slice_batch(kwargs, batch, rows)
        slot = step % 2
        sent_bytes = 0
        if step == window[0]:
            sent_bytes += executor.start_window(slot=slot, handover=mode != "reference")
        prediction, units, sent = executor.step(b_args, b_kwargs, slot=slot, last=step == window[1])
        if step == window[0] and sent_bytes:
            sent.insert(0, ("handover", sent_bytes))
        step_bytes = sum(n for _, n in sent)
        self.comm.stats.bytes_sent += step_bytes
        self.stats.pipeline_bytes += step_bytes
        self._rates.skip()
        if mode == "cached":
            delta = self._delta
            assert delta is not None
            full = torch.cat([prediction - delta, prediction])
        else:
            full = torch.cat([prediction, prediction])
        if self.recorder is not None:
            self.recorder(StepRecord(step, self.comm.rank, "pipeline", tuple(units), tuple(sent)))
        return _map_output(self._template, lambda _t: full)


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


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def walk(tree: Any) -> None:
        if isinstance(tree, torch.Tensor):
            out.append(tree)
        elif isinstance(tree, dict):
            for v in tree.values():
                walk(v)
        elif isinstance(tree, list | tuple):
            for v in tree:
                walk(v)

    walk(args)
    walk(kwargs)
    return out


def _shape_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in _tensors(args, kwargs) if t.dim() > 0)
