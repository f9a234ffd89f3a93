"""Per-unit cost of a denoiser: measured latency (and a FLOP count) at one shape, dtype and device.

The denoiser runs ``warmup`` untimed and then ``repeat`` timed forward passes, unit by unit; each unit's
cost is the median of its times over the timed passes. On CUDA a CUDA event is recorded between
consecutive units and the device is synchronised only after a whole pass, so a unit's time is what the
GPU spends between its neighbours' events, kernel-launch gaps included (as an eager stage pays them); on
CPU each unit is timed with ``time.perf_counter``. FLOPs come from one more pass under
``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.models.base import DenoiserAdapter, InputShape, TensorEdge, dtype_name, parameter_placement

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitCost:
    """One unit's median latency (ms) and FLOPs (0 when not counted) at the profiled shape."""

    name: str
    ms: float
    flops: int = 0


@dataclass(frozen=True)
class Profile:
    """Costs of every unit plus the tensors between units, at one profiling setting.

    Attributes:
        units: per-unit cost, in unit order.
        edges: every tensor passing between two units (see ``DenoiserAdapter.trace``).
        prepare_ms: the time of ``prepare`` (every stage pays it once per call).
        timer: ``"cuda-events"`` or ``"perf_counter"``.
    """

    units: list[UnitCost]
    edges: list[TensorEdge]
    batch: int
    height: int
    width: int
    dtype: str
    device: str
    device_name: str
    timer: str
    warmup: int
    repeat: int
    text_len: int | None = None
    prepare_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def costs(self) -> list[float]:
        """Unit latencies in ms, in unit order (the partitioner's input)."""
        return [u.ms for u in self.units]

    @property
    def total_ms(self) -> float:
        """Sum of the unit latencies."""
        return sum(self.costs)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def _timed_passes(
    adapter: DenoiserAdapter,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    device: torch.device,
    warmup: int,
    repeat: int,
) -> tuple[list[float], float]:
    """Per-unit median ms over ``repeat`` whole forward passes (after ``warmup`` untimed ones), and prepare's.

    Timing every unit inside complete passes, round after round, keeps the costs comparable: a slow spell
    of the machine (a busy host CPU makes eager launches slower) hits every unit of a pass alike instead
    of the units profiled during it, and caches hold what they hold in a real forward.
    """
    n = len(adapter.units)
    cuda = device.type == "cuda"
    samples: list[list[float]] = [[] for _ in range(n + 1)]  # last row: prepare
    for round_index in range(warmup + repeat):
        timed = round_index >= warmup
        if cuda:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(n + 2)]
            marks[0].record()
            state = adapter.prepare(*args, **kwargs)
            marks[1].record()
            for index in range(n):
                adapter.run_unit(index, state)
                marks[index + 2].record()
            torch.cuda.synchronize(device)
            if timed:
                samples[n].append(marks[0].elapsed_time(marks[1]))
                for index in range(n):
                    samples[index].append(marks[index + 1].elapsed_time(marks[index + 2]))
            continue
        begin = time.perf_counter()
        state = adapter.prepare(*args, **kwargs)
        stamps = [begin, time.perf_counter()]
        for index in range(n):
            adapter.run_unit(index, state)
            stamps.append(time.perf_counter())
        if timed:
            samples[n].append((stamps[1] - stamps[0]) * 1e3)
            for index in range(n):
                samples[index].append((stamps[index + 2] - stamps[index + 1]) * 1e3)
    medians = [statistics.median(s) for s in samples]
    return medians[:n], medians[n]


def _flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def profile_units(
    adapter: DenoiserAdapter,
    shape: InputShape,
    *,
    warmup: int = 3,
    repeat: int = 10,
    count_flops: bool = True,
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
) -> Profile:
    """Measure every unit of ``adapter`` at ``shape`` (``batch`` x ``height`` x ``width`` pixels).

    The model must already be on ``shape.device`` in ``shape.dtype``. ``inputs`` replaces the dummy forward
    inputs (``adapter.example_inputs(shape)``) for denoisers whose conditioning those cannot build.
    """
    device, dtype = shape.device, shape.dtype
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if shape.batch < 1 or warmup < 0 or repeat < 1:
        raise ValueError(
            f"need batch >= 1, warmup >= 0 and repeat >= 1; got {shape.batch}, {warmup}, {repeat}."
        )
    placement = parameter_placement(adapter.model)
    if placement is not None and (placement[0].type != device.type or placement[1] != dtype):
        raise ValueError(
            f"the model is on {placement[0]} in {placement[1]}, but profiling asks for {device} in {dtype}; "
            f"move it first: model.to(device={str(device)!r}, dtype={dtype})."
        )
    with torch.inference_mode():
        args, kwargs = inputs or adapter.example_inputs(dataclasses.replace(shape, device=device))
        edges = adapter.trace(*args, **kwargs)
        unit_ms, prepare_ms = _timed_passes(adapter, args, kwargs, device, warmup, repeat)
        flops = [0] * len(adapter.units)
        if count_flops:
            state = adapter.prepare(*args, **kwargs)
            for index in range(len(adapter.units)):
                flops[index] = _flops(functools.partial(adapter.run_unit, index, state))
    units = [UnitCost(unit.name, ms, f) for unit, ms, f in zip(adapter.units, unit_ms, flops, strict=True)]
    for index, cost in enumerate(units):
        logger.debug("unit %d %s: %.3f ms, %.3g FLOPs", index, cost.name, cost.ms, cost.flops)
    return Profile(
        units=units,
        edges=edges,
        batch=shape.batch,
        height=shape.height,
        width=shape.width,
        dtype=dtype_name(dtype),
        device=str(device),
        device_name=_device_name(device),
        timer="cuda-events" if device.type == "cuda" else "perf_counter",
        warmup=warmup,
        repeat=repeat,
        text_len=shape.text_len,
        prepare_ms=prepare_ms,
        extra={"torch": torch.__version__},
    )
