"""Typed, validated settings shared by the Accelerator, ``wrap`` and plans."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from accel.runtime.schedule import ScheduleError, ScheduleSettings

# Only what this version implements; an unknown value is refused with the valid choices.
Strategy = Literal["cfg", "hybrid"]
WindowGuidance = Literal["reference", "cached", "off"]
AcceleratorKind = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "fp16", "bf16"]
Backend = Literal["eager", "inductor", "aot", "onnx", "tensorrt"]

STRATEGIES: tuple[str, ...] = ("cfg", "hybrid")
WINDOW_GUIDANCE: tuple[str, ...] = ("reference", "cached", "off")
ACCELERATORS: tuple[str, ...] = ("auto", "cpu", "cuda")
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS: tuple[str, ...] = ("eager", "inductor", "aot", "onnx", "tensorrt")
#: Settings that ``Accelerator.wrap(pipe, ...)`` / ``accel.wrap(pipe, accelerator=acc, ...)`` may override.
PIPELINE_SETTINGS: tuple[str, ...] = (
    "strategy",
    "window_guidance",
    "schedule",
    "plan",
    "backend",
    "engines",
    "strict",
    "compile_vae",
)


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the setting and the valid choices."""


def _choice(name: str, value: object, valid: tuple[str, ...] | dict[str, Any]) -> None:
    if value not in valid:
        choices = ", ".join(repr(v) for v in valid)
        raise SettingsError(f"{name}={value!r} is not supported; choose one of {choices}.")


@dataclass(frozen=True, kw_only=True)
class AccelSettings:
    """Everything that decides how a pipeline is accelerated, validated once at construction.

    Attributes:
        devices: processes (one device each) per node.
        num_nodes: nodes taking part; the world size is ``devices * num_nodes``.
        accelerator: ``"cuda"`` (NCCL), ``"cpu"`` (gloo), or ``"auto"`` (CUDA when present).
        strategy: ``"cfg"`` splits the classifier-free-guidance branches across devices (exact);
            ``"hybrid"`` does that too, and pipelines the denoiser for a window of steps chosen by
            ``schedule`` (stale activations): on 2 devices one plan stage per device, on ``2k > 2`` devices
            each CFG group of ``k`` pipelines its own branch over ``k`` stages (docs/scaling.md).
        window_guidance: guidance inside the 2-device pipelined window (``strategy="hybrid"``):
            ``"reference"`` (the published behaviour: guidance dropped, stages fed mixed conditioning),
            ``"cached"`` (pipeline the conditional branch, re-apply the last measured ``eps_c - eps_u``),
            ``"off"`` (conditional branch only). Ignored on ``2k > 2`` devices, where both branches are
            pipelined and guidance uses both (logged at INFO when set to another value than the default).
        schedule: when to pipeline (``strategy="hybrid"``): a :class:`ScheduleSettings`, or ``"adaptive"``
            (the published slope rule, the default), ``"always"``, ``"never"``, or a fixed ``(start, end)``
            window of 0-based steps (inclusive).
        plan: a plan file (``accel plan ... -o FILE``) for ``strategy="hybrid"``; ``None`` profiles and
            partitions the denoiser on the first call at each shape.
        precision: cast the pipeline to this dtype on wrap; ``None`` keeps the pipeline's dtype.
        backend: how each stage (the whole denoiser in CFG steps, each rank's stage in the window, the VAE
            decoder) runs: ``"eager"``, ``"inductor"`` (torch.compile; CUDA graphs on GPU), ``"aot"``
            (torch.export + AOTInductor, replayed as a CUDA graph on GPU), ``"onnx"`` (onnxruntime) or
            ``"tensorrt"`` (torch-tensorrt extra). Compiled on first use at each shape unless ``engines``.
        engines: an engine directory written by ``accel export`` for this ``backend``; its stages are
            validated (weights, shapes, versions, checksums) and loaded instead of compiled. A stage the
            directory lacks is compiled in memory (or refused with ``strict``).
        strict: raise when a stage fails to compile or load instead of running it eagerly with a warning.
        compile_vae: also run the VAE decoder through ``backend`` (ignored for ``"eager"``).
        collective_timeout_s: a collective that waits longer than this fails instead of hanging.
    """

    devices: int = 1
    num_nodes: int = 1
    accelerator: AcceleratorKind = "auto"
    strategy: Strategy = "cfg"
    precision: Precision | None = None
    backend: Backend = "eager"
    collective_timeout_s: float = 300.0
    window_guidance: WindowGuidance = "cached"
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    plan: str | None = None
    engines: str | None = None
    strict: bool = False
    compile_vae: bool = True

    def __post_init__(self) -> None:
        for name in ("devices", "num_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name} must be a positive integer, got {value!r}.")
        _choice("accelerator", self.accelerator, ACCELERATORS)
        _choice("strategy", self.strategy, STRATEGIES)
        if self.precision is not None:
            _choice("precision", self.precision, PRECISIONS)
        _choice("backend", self.backend, BACKENDS)
        _choice("window_guidance", self.window_guidance, WINDOW_GUIDANCE)
        try:
            # Also accepts a mode name, a (start, end) window or a dict (settings travel as dicts).
            object.__setattr__(self, "schedule", ScheduleSettings.parse(self.schedule))
        except ScheduleError as exc:
            raise SettingsError(str(exc)) from None
        if self.plan is not None:
            if not isinstance(self.plan, str | os.PathLike):
                raise SettingsError(f"plan must be a path to a plan file, got {self.plan!r}.")
            object.__setattr__(self, "plan", os.fspath(self.plan))
        if self.engines is not None:
            if not isinstance(self.engines, str | os.PathLike):
                raise SettingsError(f"engines must be a path to an engine directory, got {self.engines!r}.")
            object.__setattr__(self, "engines", os.fspath(self.engines))
            if self.backend == "eager":
                raise SettingsError(
                    "engines= needs a compiled backend: pass the backend the directory was exported with "
                    "(backend='aot', 'inductor', 'onnx' or 'tensorrt'; see the directory's manifest.json)."
                )
        for name in ("strict", "compile_vae"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if not self.collective_timeout_s > 0:
            raise SettingsError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s!r}.")
        world = self.world_size
        if world > 1 and world % 2:
            raise SettingsError(
                f"world size {world} (devices={self.devices} x num_nodes={self.num_nodes}) is odd: "
                "the two guidance branches need an even number of devices. Use 1, 2 or another even count."
            )

    @property
    def world_size(self) -> int:
        """Total number of processes."""
        return self.devices * self.num_nodes

    @property
    def dtype(self) -> torch.dtype | None:
        """The torch dtype of ``precision`` (``None`` keeps the pipeline's)."""
        return None if self.precision is None else PRECISIONS[self.precision]

    def replace(self, **changes: Any) -> AccelSettings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """A short hash of every field, used to check that all ranks agree."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
