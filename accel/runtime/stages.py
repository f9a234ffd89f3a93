"""Pieces of the pipelined window that do not depend on how many stages or groups there are.

``run_stage`` runs one stage's unit segments on the boundary tensors other stages produced;
``decide_window`` turns the schedule and the rates measured so far into the window.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from accel.models import DenoiserAdapter, SegmentState, TensorEdge
from accel.runtime.schedule import ResolvedSchedule, clamp_window, taus

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (tensor name, producer unit): unique per step


def run_stage(
    adapter: DenoiserAdapter,
    segments: Sequence[tuple[int, int]],
    edges: Sequence[TensorEdge],
    owner: Sequence[int],
    initial: SegmentState,
    received: dict[Key, torch.Tensor],
) -> tuple[SegmentState, dict[Key, torch.Tensor], list[int]]:
    """Run one stage's unit segments in order.

    A segment's inputs come from the stage's own earlier segments (this step) or from ``received`` (the
    other stages' tensors); ``initial`` is the ``prepare`` state of this step (units from 0 read it).
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
        state = adapter.run(adapter.with_tensors(initial.context, tensors, lo), lo, hi)
        units.extend(range(lo, hi))
        named = adapter.state_tensors(state, hi)
        for e in edges:
            if lo <= e.producer < hi <= e.consumer:
                local[(e.name, e.producer)] = named[e.name]
    return state, local, units


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
