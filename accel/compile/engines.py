"""Which stage callables a plan needs, under which engine keys, and exporting / loading them all.

For every shape bucket ``(height, width, batch)`` of a plan there is one whole-denoiser stage for the CFG
phase (key ``cfg.full.<H>x<W>.b<B>``) and, for a plan with more than one device, one stage per unit
segment of each device's window stage (key ``window.s<k>.u<lo>-<hi>.<H>x<W>.b<B>``). ``batch`` is the
per-branch batch the plan was profiled with (one guidance branch per device in the CFG phase); a
one-device plan's CFG stage runs both branches in one call, so its key and shape hold ``2 * batch``.
:func:`engine_stages` lists them; export (:func:`stage_jobs`) and the runtime
(:mod:`accel.runtime.compiled`, :func:`accel.runtime.stages.compile_segments`) both take their keys from it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from accel.compile.backends import Backend, get_backend
from accel.compile.stage import DecoderStage, build_stage, decoder_dtype
from accel.compile.store import EngineRecord, EngineStore
from accel.models import adapt
from accel.models.base import InputShape, dtype_name, parameter_placement
from accel.settings import PRECISIONS

Segment = tuple[int, int]


def cfg_key(height: int, width: int, batch: int) -> str:
    """Engine key of the whole-denoiser stage of the CFG phase."""
    return f"cfg.full.{height}x{width}.b{batch}"


def window_key(stage: int, lo: int, hi: int, height: int, width: int, batch: int) -> str:
    """Engine key of units ``[lo, hi)`` of plan stage ``stage`` in the window."""
    return f"window.s{stage}.u{lo}-{hi}.{height}x{width}.b{batch}"


def decoder_key(z: torch.Tensor) -> str:
    """Engine key of the VAE decoder for latents ``z``: ``vae.decoder.<h>x<w>.b<B>.<dtype>`` (latent size)."""
    return f"vae.decoder.{z.shape[-2]}x{z.shape[-1]}.b{z.shape[0]}.{dtype_name(z.dtype)}"


@dataclass(frozen=True)
class EngineStage:
    """One stage callable of a shape bucket: its engine key and the units ``[lo, hi)`` it runs.

    ``phase`` is ``"cfg"`` (the whole denoiser, ``whole=True`` in :func:`build_stage`) or ``"window"``
    (one unit segment of plan stage ``stage``).
    """

    key: str
    phase: str
    lo: int
    hi: int
    stage: int = 0

    @property
    def whole(self) -> bool:
        return self.phase == "cfg"


def engine_stages(stages: Sequence[Sequence[Segment]], n_units: int, shape: InputShape) -> list[EngineStage]:
    """Every stage callable of a plan at ``shape``, keyed: what export writes and what the runtime looks up.

    ``stages`` are the plan's unit segments per stage; a plan of one stage has no window stages.
    """
    h, w, b = shape.height, shape.width, shape.batch
    found = [EngineStage(cfg_key(h, w, b), "cfg", 0, n_units)]
    if len(stages) < 2:
        return found
    for k, segments in enumerate(stages):
        for lo, hi in segments:
            found.append(EngineStage(window_key(k, lo, hi, h, w, b), "window", lo, hi, stage=k))
    return found


@dataclass
class StageJob:
    """One stage to compile: its engine key, the stage module and example inputs at its shape."""

    key: str
    phase: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]


def stage_jobs(plan: Any, model: torch.nn.Module) -> Iterator[StageJob]:
    """The stages of ``plan`` (an :class:`accel.plan.Plan`) for ``model``, bucket by bucket."""
    placement = parameter_placement(model)
    if placement is None:
        raise ValueError(f"{type(model).__name__} has no floating-point parameters.")
    device, dtype = placement
    adapter = adapt(model)
    segments = [stage.segments for stage in plan.stages]
    for shape in plan.shapes(device, dtype):
        if plan.devices < 2:
            # One device runs both guidance branches in one call: its stage sees the unsplit 2B batch.
            shape = dataclasses.replace(shape, batch=2 * shape.batch)
        args, kwargs = adapter.example_inputs(shape)
        for entry in engine_stages(segments, len(adapter.units), shape):
            module, inputs = build_stage(adapter, entry.lo, entry.hi, args, kwargs, whole=entry.whole)
            yield StageJob(entry.key, entry.phase, module, inputs)


def decoder_jobs(plan: Any, vae: torch.nn.Module, device: Any) -> Iterator[StageJob]:
    """The VAE decoder of the pipeline ``plan`` was made for, once per shape bucket (key: ``decoder_key``).

    Its dtype is the one the pipeline decodes in (:func:`accel.compile.stage.decoder_dtype`), so the runtime
    finds the engine under the same key as the latents it is given.
    """
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, torch.nn.Module):
        raise ValueError(f"{type(vae).__name__} has no decoder module to export.")
    dtype = decoder_dtype(vae, PRECISIONS[plan.dtype])
    channels = int(getattr(vae.config, "latent_channels", 4))
    module = DecoderStage(copy.deepcopy(decoder).to(device, dtype).eval().requires_grad_(False))
    gen = torch.Generator("cpu").manual_seed(0)
    for shape in plan.shapes(device, dtype):
        scale = shape.vae_scale_factor
        z = torch.randn(shape.batch, channels, shape.height // scale, shape.width // scale, generator=gen)
        z = z.to(device, dtype)
        yield StageJob(decoder_key(z), "vae", module, (z,))


def export_plan(
    plan: Any,
    model: torch.nn.Module,
    backend: str | Backend,
    directory: Any,
    *,
    rebuild: bool = False,
    on_stage: Callable[[StageJob, str], None] | None = None,
    vae: torch.nn.Module | None = None,
    tune_budget_s: float | None = None,
) -> list[EngineRecord]:
    """Export every stage of ``plan`` (and, given ``vae``, its decoder) into the engine directory.

    ``on_stage(job, event)`` hears ``"start"`` before each stage and then ``"done"`` (written) or
    ``"kept"`` (a fitting engine was there). The keys are recorded first (:meth:`EngineStore.expect`),
    so an interrupted export is reported as incomplete. ``tune_budget_s`` bounds each stage's tuning
    searches (:meth:`EngineStore.export`).
    """
    store = EngineStore(directory)
    impl = get_backend(backend)
    impl.check_available()
    records = []
    device = next(model.parameters()).device
    jobs: list[StageJob] = list(stage_jobs(plan, model))
    if vae is not None:
        jobs += decoder_jobs(plan, vae, device)
    store.expect([job.key for job in jobs])
    before = store.records()
    # The decoder's projections stay as they are: its manifest entries say so.
    unfused = impl.tuned(dataclasses.replace(impl.tuning, fused_qkv=False))
    for job in jobs:
        if on_stage is not None:
            on_stage(job, "start")
        how = unfused if job.phase == "vae" else impl
        record = store.export(
            job.key, how, job.module, job.example_inputs, rebuild=rebuild, tune_budget_s=tune_budget_s
        )
        records.append(record)
        if on_stage is not None:
            on_stage(job, "kept" if before.get(job.key) == record else "done")
    return records
