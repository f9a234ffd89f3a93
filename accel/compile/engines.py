"""Which stage callables a plan needs, under which engine keys, and exporting / loading them all.

For every shape bucket ``(height, width, batch)`` of a plan there is one whole-denoiser stage for the CFG
phase (key ``cfg.full.<H>x<W>.b<B>``) and, for a plan with more than one device, one stage per unit
segment of each device's window stage (key ``window.s<k>.u<lo>-<hi>.<H>x<W>.b<B>``). ``batch`` is the
per-branch batch the plan was profiled with (one guidance branch per device in the CFG phase); a
one-device plan's CFG stage runs both branches in one call, so its key and shape hold ``2 * batch``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from accel.compile.backends import Backend, StageCallable, get_backend
from accel.compile.stage import DecoderStage, build_stage, decoder_dtype
from accel.compile.store import EngineRecord, EngineStore
from accel.models import adapt
from accel.models.base import dtype_name


def bucket(height: int, width: int, batch: int) -> str:
    """The shape part of an engine key: ``<H>x<W>.b<B>`` (pixels; per-branch batch)."""
    return f"{height}x{width}.b{batch}"


def cfg_key(height: int, width: int, batch: int) -> str:
    """Engine key of the whole-denoiser stage of the CFG phase."""
    return f"cfg.full.{bucket(height, width, batch)}"


def window_key(stage: int, lo: int, hi: int, height: int, width: int, batch: int) -> str:
    """Engine key of units ``[lo, hi)`` of plan stage ``stage`` in the window."""
    return f"window.s{stage}.u{lo}-{hi}.{bucket(height, width, batch)}"


def decoder_key(z: torch.Tensor) -> str:
    """Engine key of the VAE decoder for latents ``z``: ``vae.decoder.<h>x<w>.b<B>.<dtype>`` (latent size)."""
    return f"vae.decoder.{bucket(z.shape[-2], z.shape[-1], z.shape[0])}.{dtype_name(z.dtype)}"


@dataclass
class StageJob:
    """One stage to compile: its engine key, the stage module and example inputs at its shape."""

    key: str
    phase: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]


def stage_jobs(plan: Any, model: torch.nn.Module) -> Iterator[StageJob]:
    """The stages of ``plan`` (an :class:`accel.plan.Plan`) for ``model``, bucket by bucket."""
    from accel.models.base import parameter_placement

    placement = parameter_placement(model)
    if placement is None:
        raise ValueError(f"{type(model).__name__} has no floating-point parameters.")
    device, dtype = placement
    adapter = adapt(model)
    text_len = plan.profile.get("text_len")
    vae_scale_factor = int(plan.profile.get("vae_scale_factor", 8))
    # One device runs both guidance branches in one call, so its whole-denoiser stage sees the unsplit
    # 2B batch; with two or more devices each CFG call holds one branch.
    branches = 2 if plan.devices < 2 else 1
    for height, width in plan.resolutions:
        for batch in plan.batches:
            inputs_at = functools.partial(
                adapter.example_inputs,
                height=height,
                width=width,
                dtype=dtype,
                device=device,
                text_len=text_len,
                vae_scale_factor=vae_scale_factor,
            )
            args, kwargs = inputs_at(batch=branches * batch)
            module, inputs = build_stage(adapter, 0, len(adapter.units), args, kwargs, whole=True)
            yield StageJob(cfg_key(height, width, branches * batch), "cfg", module, inputs)
            if plan.devices < 2:
                continue
            args, kwargs = inputs_at(batch=batch)
            for k, stage in enumerate(plan.stages):
                for lo, hi in stage.segments:
                    module, inputs = build_stage(adapter, lo, hi, args, kwargs)
                    yield StageJob(window_key(k, lo, hi, height, width, batch), "window", module, inputs)


def decoder_jobs(plan: Any, vae: torch.nn.Module, device: Any) -> Iterator[StageJob]:
    """The VAE decoder of the pipeline ``plan`` was made for, once per shape bucket (key: ``decoder_key``).

    Its dtype is the one the pipeline decodes in (:func:`accel.compile.stage.decoder_dtype`), so the runtime
    finds the engine under the same key as the latents it is given.
    """
    import copy

    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, torch.nn.Module):
        raise ValueError(f"{type(vae).__name__} has no decoder module to export.")
    from accel.settings import PRECISIONS

    dtype = decoder_dtype(vae, PRECISIONS[plan.dtype])
    channels = int(getattr(vae.config, "latent_channels", 4))
    scale = int(plan.profile.get("vae_scale_factor", 8))
    module = DecoderStage(copy.deepcopy(decoder).to(device, dtype).eval().requires_grad_(False))
    gen = torch.Generator("cpu").manual_seed(0)
    for height, width in plan.resolutions:
        for batch in plan.batches:
            z = torch.randn(batch, channels, height // scale, width // scale, generator=gen).to(device, dtype)
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
) -> list[EngineRecord]:
    """Export every stage of ``plan`` (and, given ``vae``, its decoder) into the engine directory;
    ``on_stage(job, "start"|"done")``."""
    import itertools

    store = EngineStore(directory)
    impl = get_backend(backend)
    impl.check_available()
    records = []
    device = next(model.parameters()).device
    jobs = stage_jobs(plan, model)
    if vae is not None:
        jobs = itertools.chain(jobs, decoder_jobs(plan, vae, device))
    for job in jobs:
        if on_stage is not None:
            on_stage(job, "start")
        records.append(store.export(job.key, impl, job.module, job.example_inputs, rebuild=rebuild))
        if on_stage is not None:
            on_stage(job, "done")
    return records


def load_plan_engines(
    plan: Any, model: torch.nn.Module, backend: str | Backend, directory: Any, *, rebuild: bool = False
) -> dict[str, tuple[torch.nn.Module, StageCallable]]:
    """Every stage of ``plan`` as ``key -> (stage module, loaded callable)``, validated before loading."""
    store = EngineStore(directory)
    impl = get_backend(backend)
    return {
        job.key: (job.module, store.load(job.key, impl, job.module, job.example_inputs, rebuild=rebuild))
        for job in stage_jobs(plan, model)
    }
