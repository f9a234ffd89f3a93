"""Pieces of the pipelined window that do not depend on how many stages or groups there are.

:class:`StageExecutor` runs one stage of a plan on the boundary tensors the other stages produced at the
previous step and exchanges them (``batch_isend_irecv`` into double-buffered receive slots);
:func:`run_stage` is its compute loop; :func:`compile_segments` routes its unit segments through compiled
stage callables; :func:`decide_window` turns the schedule and the rates measured so far into the window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from accel.models import DenoiserAdapter, SegmentState, TensorEdge
from accel.partition import stage_owners
from accel.runtime.schedule import clamp_window, taus
from accel.settings import ResolvedSchedule

if TYPE_CHECKING:
    from accel.compile.runner import StageRunner

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (tensor name, producer unit): unique per step
Segment = tuple[int, int]
#: a compiled unit segment: the stage module (which maps states to its flat inputs) and its callable
CompiledSegment = tuple[Any, Callable[..., Any]]

PREDICTION = "prediction"
# Message tags (gloo matches by peer and tag; NCCL ignores tags and keeps the issue order on both ranks).
TAG_BOUNDARY, TAG_PREDICTION, TAG_HANDOVER = 1, 2, 3


def run_stage(
    adapter: DenoiserAdapter,
    segments: Sequence[Segment],
    edges: Sequence[TensorEdge],
    owner: Sequence[int],
    initial: SegmentState,
    received: Mapping[Key, torch.Tensor],
    compiled: Mapping[Segment, CompiledSegment] | None = None,
) -> tuple[SegmentState, dict[Key, torch.Tensor], list[int]]:
    """Run one stage's unit segments in order.

    A segment's inputs come from the stage's own earlier segments (this step) or from ``received`` (the
    other stages' tensors); ``initial`` is the ``prepare`` state of this step (units from 0 read it). A
    segment found in ``compiled`` runs through its compiled callable, the others eagerly.
    Returns the state after the last segment, every boundary tensor produced (by key), and the units run.
    """
    stage = owner[segments[0][0]]
    local: dict[Key, torch.Tensor] = {}
    units: list[int] = []
    state = initial
    for lo, hi in segments:
        tensors: dict[str, torch.Tensor] = {}
        if lo == 0:
            tensors.update(adapter.state_tensors(initial, 0))
        for e in edges:
            if lo <= e.consumer < hi and e.producer < lo:
                key = (e.name, e.producer)
                tensors[e.name] = local[key] if owner[e.producer] == stage else received[key]
        state = run_segment(adapter, adapter.with_tensors(initial.context, tensors, lo), lo, hi, compiled)
        units.extend(range(lo, hi))
        named = adapter.state_tensors(state, hi)
        for e in edges:
            if lo <= e.producer < hi <= e.consumer:
                local[(e.name, e.producer)] = named[e.name]
    return state, local, units


def run_segment(
    adapter: DenoiserAdapter,
    state: SegmentState,
    lo: int,
    hi: int,
    compiled: Mapping[Segment, CompiledSegment] | None = None,
) -> SegmentState:
    """Units ``[lo, hi)`` on ``state``: through the compiled callable of the segment if there is one."""
    found = compiled.get((lo, hi)) if compiled else None
    if found is None:
        return adapter.run(state, lo, hi)
    module, fn = found
    return module.run_state(fn, state)


def compile_segments(
    runner: StageRunner,
    adapter: DenoiserAdapter,
    stages: Sequence[Sequence[Segment]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    batch: int,
    vae_scale_factor: int,
) -> dict[Segment, CompiledSegment]:
    """Compiled callables for every unit segment of every stage, under the engine keys ``accel export``
    writes (``window.s<k>.u<lo>-<hi>.<H>x<W>.b<batch>``); ``args``/``kwargs`` are one branch's inputs.

    Every segment, not only this rank's: the step that captures the window's starting activations runs
    them all in unit order, and is then as fast as a compiled whole-denoiser step.
    """
    from accel.compile.engines import window_key
    from accel.compile.stage import build_stage

    sample = tensors_of(args, kwargs)[0]
    height, width = sample.shape[-2] * vae_scale_factor, sample.shape[-1] * vae_scale_factor
    compiled: dict[Segment, CompiledSegment] = {}
    for k, segments in enumerate(stages):
        for lo, hi in segments:
            key = window_key(k, lo, hi, height, width, batch)
            with torch.no_grad():
                module, inputs = build_stage(adapter, lo, hi, args, kwargs)
            fn = runner.get(key, module, inputs, cache_key=(key, shape_key(args, kwargs)))
            compiled[(lo, hi)] = (module, fn)
    return compiled


class StageExecutor:
    """Runs stage ``stage`` of a plan on stale boundary tensors and exchanges them (one per shape).

    Args:
        adapter: the denoiser adapter.
        stages: unit segments ``[lo, hi)`` per stage (from the plan).
        edges: every tensor edge between units at this shape (``adapter.trace``).
        stage: the stage this rank runs.
        peers: the global rank running each stage, in stage order.
        device: where the receive buffers live.
        group: the process group of the point-to-point transfers (``None``: the default group).

    ``compiled``: compiled callables of unit segments (:func:`compile_segments`); the others run eagerly.
    """

    def __init__(
        self,
        adapter: DenoiserAdapter,
        stages: Sequence[Sequence[Segment]],
        edges: Sequence[TensorEdge],
        *,
        stage: int,
        peers: Sequence[int],
        device: torch.device,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if len(peers) != len(stages) or not 0 <= stage < len(stages):
            raise ValueError(
                f"stage {stage} and {len(peers)} peers do not fit a plan of {len(stages)} stages."
            )
        self.adapter = adapter
        self.stage = stage
        self.peers = list(peers)
        self.device = device
        self.group = group
        n = len(adapter.units)
        self.owner = stage_owners(stages, n)
        self.segments = [sorted((int(lo), int(hi)) for lo, hi in segs) for segs in stages]
        self.all_segments = sorted(seg for segs in self.segments for seg in segs)
        self.edges = list(edges)
        self.last_stage = self.owner[n - 1]
        self._edge = {(e.name, e.producer): e for e in self.edges}
        #: per stage, the boundary tensors it reads, in one order every rank derives alike (message order)
        self.inputs_of: list[list[Key]] = [
            list(
                dict.fromkeys(
                    (e.name, e.producer)
                    for e in self.edges
                    if self.owner[e.consumer] == k and self.owner[e.producer] != k
                )
            )
            for k in range(len(stages))
        ]
        self.inputs = self.inputs_of[stage]
        self.outgoing = {
            dest: [key for key in self.inputs_of[dest] if self.owner[key[1]] == stage]
            for dest in range(len(stages))
            if dest != stage
        }
        self.incoming = {
            src: [key for key in self.inputs if self.owner[key[1]] == src]
            for src in range(len(stages))
            if src != stage
        }
        # Double-buffered receive slots for this stage's inputs (slot = step % 2).
        self.slots: list[dict[Key, torch.Tensor]] = [
            {key: self.buffer(key) for key in self.inputs} for _ in range(2)
        ]
        self.compiled: dict[Segment, CompiledSegment] = {}
        self._placeholder: torch.Tensor | None = None
        self._pending: list[Any] = []  # transfers of the previous step (waited for before use)
        self._keep: list[torch.Tensor] = []  # tensors being sent (kept alive until their works finish)

    def buffer(self, key: Key) -> torch.Tensor:
        """An uninitialised tensor shaped like boundary tensor ``key`` at this shape."""
        e = self._edge[key]
        return torch.empty(e.shape, dtype=getattr(torch, e.dtype), device=self.device)

    def nbytes(self, key: Key) -> int:
        """Size of boundary tensor ``key`` at this shape."""
        return self._edge[key].nbytes

    def forward_capturing(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        slot: int | None,
        extra: Mapping[Key, torch.Tensor] | None = None,
    ) -> tuple[Any, list[str]]:
        """The whole denoiser through the adapter (equal to ``model.forward``), keeping copies of this
        stage's input boundary tensors in receive slot ``slot`` (none with ``None``) and of the tensors
        ``extra`` names in its buffers; returns the output and what was kept."""
        adapter = self.adapter
        wanted: dict[Key, torch.Tensor] = dict(self.slots[slot]) if slot is not None else {}
        wanted.update(extra or {})
        state = adapter.prepare(*args, **kwargs)
        captured: list[str] = []
        for lo, hi in self.all_segments:
            state = run_segment(adapter, state, lo, hi, self.compiled)
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
            adapter,
            self.segments[self.stage],
            self.edges,
            self.owner,
            initial,
            self.slots[slot],
            self.compiled,
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
                ops.append(dist.P2POp(dist.isend, tensor, self.peers[dest], self.group, TAG_BOUNDARY))
                sent.append((f"{key[0]}@{key[1]}", self.nbytes(key)))
        nxt = self.slots[1 - slot]
        for src, keys in sorted(self.incoming.items()):
            for key in keys:
                ops.append(dist.P2POp(dist.irecv, nxt[key], self.peers[src], self.group, TAG_BOUNDARY))
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


def decide_window(
    schedule: ResolvedSchedule, rates: Sequence[float], step: int, total: int | None
) -> tuple[int, int, tuple[int, int] | None] | None:
    """``(tau1, tau2, window)`` once the rates of steps ``0 .. step-1`` decide them (``None``: not yet).

    ``tau2`` of ``"always"`` is reported as the last step it pipelines; the window is clamped to ``total``
    steps and dropped when it would have had to start before ``step``.
    """
    found = taus(schedule, rates)
    if found is None:
        return None
    last = total if total is not None else 2**31
    tau2 = found[1] if schedule.mode != "always" else max(found[0], last - 1)
    window = clamp_window(found[0], found[1], last)
    if window is not None and window[0] < step:
        log.warning(
            "the window (%d, %d) was decided at step %d, after it began: it is skipped", *window, step
        )
        window = None
    return found[0], tau2, window


def first_tensor(output: Any) -> torch.Tensor:
    """The first tensor of a denoiser output (a tensor, a tuple or a diffusers output): the prediction."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return first_tensor(output[0])
    values = output.values() if hasattr(output, "values") else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no tensor in the denoiser output {type(output).__name__}.")


def tensors_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor in a call's arguments (nested dicts, lists and tuples), in order."""
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


def shape_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Shapes, dtypes and devices of a call's non-scalar tensors: one executor (and plan) per key."""
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors_of(args, kwargs) if t.dim() > 0)
