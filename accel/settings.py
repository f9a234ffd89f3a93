"""Typed, validated settings shared by the Accelerator, ``wrap``, plans and the command line.

The ground floor: imports nothing of accel but its errors, and not torch until a precision is looked up,
so that the command line can take its choices from the ``Literal`` types below. The rules that several
places apply (counts, world size, per-pipeline settings) live here as ``check_*`` functions.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from accel.errors import AccelError

if TYPE_CHECKING:
    import torch

ScheduleMode = Literal["adaptive", "window", "always", "never"]
SCHEDULE_MODES: tuple[str, ...] = get_args(ScheduleMode)


class ScheduleError(AccelError, ValueError):
    """A schedule setting is invalid; the message names the field and the valid values."""


@dataclass(frozen=True)
class FamilyDefaults:
    """The switch-rule constants of one denoiser family, chosen for a run of ``steps`` steps."""

    lookback: int
    eps: float
    k: int
    tau_cap: int
    steps: int = 50

    def scaled(self, num_steps: int | None) -> FamilyDefaults:
        """The same rule for a run of ``num_steps`` steps: the step counts ``lookback``, ``k`` and
        ``tau_cap`` scaled by ``num_steps / steps`` (rounded half up; ``lookback >= 2``, ``k >= 1``,
        ``tau_cap >= 1``), and ``eps``, a rate change per step, by the inverse. ``None``: unchanged."""
        if num_steps is None or num_steps == self.steps:
            return self
        f = num_steps / self.steps
        return FamilyDefaults(
            lookback=max(2, _half_up(self.lookback * f)),
            eps=self.eps / f,
            k=max(1, _half_up(self.k * f)),
            tau_cap=max(1, _half_up(self.tau_cap * f)),
            steps=num_steps,
        )


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


SchedulePreset = Literal["accel", "published"]
SCHEDULE_PRESETS: tuple[str, ...] = get_args(SchedulePreset)

#: The published constants (arXiv 2602.21760, 50 steps) per family: SDXL (U-Net) and SD3 (DiT).
PUBLISHED_DEFAULTS: dict[str, FamilyDefaults] = {
    "unet": FamilyDefaults(lookback=12, eps=4e-4, k=5, tau_cap=15),
    "dit": FamilyDefaults(lookback=15, eps=5e-4, k=5, tau_cap=40),
}
#: accel's defaults: the published constants, except the DiT's latest switch step (published: 40).
#: SD3's flow-matching schedule takes its largest steps last, so a fallback window at steps 41-45
#: deviated most of all window positions measured on the trained 8x8 SD3-family digits model
#: (docs/quality.md); with 20 the fallback window is steps 21-25. That is the only evidence for 20: it
#: is accel's choice, not a published constant (``ScheduleSettings(preset="published")`` restores 40).
FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "unet": PUBLISHED_DEFAULTS["unet"],
    "dit": FamilyDefaults(lookback=15, eps=5e-4, k=5, tau_cap=20),
}
#: The constants of each preset, per family.
SCHEDULE_PRESET_DEFAULTS: dict[str, dict[str, FamilyDefaults]] = {
    "accel": FAMILY_DEFAULTS,
    "published": PUBLISHED_DEFAULTS,
}


def _positive_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ScheduleError(f"schedule {name} must be an integer >= {minimum}, got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class ScheduleSettings:
    """When the hybrid runtime pipelines (validated on construction).

    Attributes:
        mode: ``"adaptive"`` (the published slope rule), ``"window"`` (the fixed steps ``window``),
            ``"always"`` (pipeline every step after a warm-up of ``lookback`` CFG steps), ``"never"``
            (CFG split only; exact).
        window: ``(start, end)``, 0-based steps, inclusive, for ``mode="window"``; ``start >= 1``, since the
            window starts from activations of the CFG step before it. An end past the last step is clamped.
        preset: where the constants left ``None`` come from: ``"accel"`` (accel's defaults: the published
            constants except SD3's ``tau_cap``, 20 instead of 40) or ``"published"`` (the paper's
            constants: SDXL ``L=12, eps=4e-4, k=5, tau_cap=15``; SD3 ``L=15, eps=5e-4, k=5, tau_cap=40``).
            Preset constants are for 50 steps; a call with another step count scales them to it
            (:meth:`FamilyDefaults.scaled`), so the window keeps its place in the run and the last steps
            stay exact. Constants set here are used as they are.
        lookback: ``L`` of the slope rule, ``>= 2`` (the slope compares ``r[i-L+1]`` with ``r[i]``).
        eps: slope threshold (> 0).
        k: pipelined steps per window (>= 1).
        tau_cap: latest switch step (>= 0).
    """

    mode: ScheduleMode = "adaptive"
    window: tuple[int, int] | None = None
    preset: SchedulePreset = "accel"
    lookback: int | None = None
    eps: float | None = None
    k: int | None = None
    tau_cap: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULE_MODES:
            choices = ", ".join(repr(m) for m in SCHEDULE_MODES)
            raise ScheduleError(f"schedule mode {self.mode!r} is not supported; choose one of {choices}.")
        if self.preset not in SCHEDULE_PRESETS:
            choices = ", ".join(repr(p) for p in SCHEDULE_PRESETS)
            raise ScheduleError(f"schedule preset {self.preset!r} is not supported; choose one of {choices}.")
        if self.mode == "window":
            window = self.window
            if (
                not isinstance(window, Sequence)
                or isinstance(window, str)
                or len(window) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in window)
            ):
                raise ScheduleError(
                    f"schedule window must be a (start, end) pair of integers, got {window!r}."
                )
            start, end = int(window[0]), int(window[1])
            if start < 1 or end < start:
                raise ScheduleError(
                    f"schedule window {tuple(window)!r} is invalid: need 1 <= start <= end (0-based steps, "
                    "inclusive; step 0 must be a CFG step, whose activations start the window)."
                )
            object.__setattr__(self, "window", (start, end))
        elif self.window is not None:
            raise ScheduleError(f"schedule window={self.window!r} needs mode='window', not {self.mode!r}.")
        if self.lookback is not None:
            # L = 1 compares r[i] with itself: the slope is always 0 and the rule fires at step 1.
            _positive_int("lookback", self.lookback, 2)
        if self.k is not None:
            _positive_int("k", self.k, 1)
        if self.tau_cap is not None:
            _positive_int("tau_cap", self.tau_cap, 0)
        if self.eps is not None and (
            isinstance(self.eps, bool) or not isinstance(self.eps, int | float) or not self.eps > 0
        ):
            raise ScheduleError(f"schedule eps must be a number > 0, got {self.eps!r}.")

    @classmethod
    def parse(cls, value: Any) -> ScheduleSettings:
        """Accept ``None`` (adaptive), a mode name, a ``(start, end)`` window, a dict or a ScheduleSettings."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(mode=value)  # type: ignore[arg-type]
        if isinstance(value, Mapping):
            data = dict(value)
            if data.get("window") is not None:
                data["window"] = tuple(data["window"])
            try:
                return cls(**data)
            except TypeError as exc:
                raise ScheduleError(f"invalid schedule settings {value!r}: {exc}") from None
        if isinstance(value, Sequence):
            return cls(mode="window", window=tuple(value))  # type: ignore[arg-type]
        raise ScheduleError(
            f"schedule={value!r} is not understood: pass 'adaptive', 'always', 'never', a (start, end) "
            "window or ScheduleSettings(...)."
        )

    def resolve(self, family: str, num_steps: int | None = None) -> ResolvedSchedule:
        """Fill the constants left ``None`` from the preset of ``family`` (``"unet"`` or ``"dit"``), scaled
        to a call of ``num_steps`` steps (``None``: as chosen, for 50 steps)."""
        table = SCHEDULE_PRESET_DEFAULTS[self.preset]
        defaults = table.get(family, table["unet"]).scaled(num_steps)
        return ResolvedSchedule(
            mode=self.mode,
            window=self.window,
            lookback=defaults.lookback if self.lookback is None else self.lookback,
            eps=defaults.eps if self.eps is None else float(self.eps),
            k=defaults.k if self.k is None else self.k,
            tau_cap=defaults.tau_cap if self.tau_cap is None else self.tau_cap,
        )


@dataclass(frozen=True)
class ResolvedSchedule:
    """A schedule with every constant filled in."""

    mode: str
    window: tuple[int, int] | None
    lookback: int
    eps: float
    k: int
    tau_cap: int


# Only what this version implements; an unknown value is refused with the valid choices.
Strategy = Literal["cfg", "hybrid"]
WindowGuidance = Literal["reference", "cached", "off"]
AcceleratorKind = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "fp16", "bf16"]
Backend = Literal["eager", "inductor", "aot", "onnx", "tensorrt"]

STRATEGIES: tuple[str, ...] = get_args(Strategy)
WINDOW_GUIDANCE: tuple[str, ...] = get_args(WindowGuidance)
ACCELERATORS: tuple[str, ...] = get_args(AcceleratorKind)
BACKENDS: tuple[str, ...] = get_args(Backend)


class _TorchDtypes(Mapping[str, "torch.dtype"]):
    """Precision name -> torch dtype. Torch is imported on the first lookup, not with this module: the
    command line reads these settings' choices, and ``accel --help`` must not wait for torch."""

    _NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

    def __getitem__(self, name: str) -> torch.dtype:
        import torch

        return getattr(torch, self._NAMES[name])  # type: ignore[no-any-return]

    def __contains__(self, name: object) -> bool:
        return name in self._NAMES

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


PRECISIONS: Mapping[str, torch.dtype] = _TorchDtypes()
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


class SettingsError(AccelError, ValueError):
    """A setting has an invalid value; the message names the setting and the valid choices."""


def check_count(name: str, value: object, error: type[AccelError] | None = None) -> None:
    """Refuse (``error``, default :class:`SettingsError`) a count of processes or nodes that is not a
    positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise (error or SettingsError)(f"{name} must be a positive integer, got {value!r}.")


def check_world_size(devices: int, num_nodes: int = 1, error: type[AccelError] | None = None) -> None:
    """Refuse (``error``, default :class:`SettingsError`) an odd world size above 1: the two guidance
    branches split the processes into two equal CFG groups."""
    world = devices * num_nodes
    if world > 1 and world % 2:
        layout = f" (devices={devices} x num_nodes={num_nodes})" if num_nodes > 1 or error is None else ""
        raise (error or SettingsError)(
            f"world size {world}{layout} is odd: the two guidance branches need an even number of devices. "
            "Use 1, 2 or another even count."
        )


def check_pipeline_settings(names: Iterable[str]) -> None:
    """Refuse settings that cannot change per pipeline (only :data:`PIPELINE_SETTINGS` can)."""
    other = sorted(set(names) - set(PIPELINE_SETTINGS))
    if other:
        raise SettingsError(
            f"{', '.join(other)} cannot change per pipeline: pass settings either to the Accelerator or to "
            f"wrap(), not both. Per-pipeline settings are {', '.join(PIPELINE_SETTINGS)}; pass the others to "
            "the Accelerator."
        )


@dataclass(frozen=True)
class Tuning:
    """How the ``inductor`` and ``aot`` backends build a stage beyond their defaults; each option keeps
    the stage exact up to floating-point reordering (none is lossy).

    Attributes:
        conv_1x1_as_mm: 1x1 convolutions as matrix products (inductor's ``conv_1x1_as_mm``).
        coordinate_descent: coordinate-descent search of each generated kernel's launch parameters
            (``coordinate_descent_tuning``).
        autotune: benchmark GEMM and convolution choices (Triton templates, cuBLAS, cuDNN) per shape and keep
            the fastest (``max_autotune``); minutes per stage, which an engine pays once at export.
        fused_qkv: each attention's q/k/v projections as one matrix product (diffusers'
            ``fuse_qkv_projections``, :mod:`accel.models.fusion`); a run fuses the live denoiser the same way
            before loading such engines, which keeps fused copies of those weights beside the originals.

    Engines record the tuning they were built with (``accel inspect ENGINES``); ``accel export`` rebuilds
    an engine built with other tuning, and a run loads an engine with the tuning it was built with.
    """

    conv_1x1_as_mm: bool = False
    coordinate_descent: bool = False
    autotune: bool = False
    fused_qkv: bool = False

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, bool):
                raise SettingsError(f"tuning {name}={value!r} must be True or False.")

    @property
    def searches(self) -> bool:
        """Whether building with these options benchmarks candidates (``coordinate_descent``,
        ``autotune``): minutes per stage, what an export's tuning budget bounds."""
        return self.coordinate_descent or self.autotune

    def without_search(self) -> Tuning:
        """These options less the searches: what a stage that ran past its tuning budget is built with."""
        return dataclasses.replace(self, coordinate_descent=False, autotune=False)

    @classmethod
    def full(cls) -> Tuning:
        """Every option on: what ``accel export --tune all`` builds."""
        return cls(conv_1x1_as_mm=True, coordinate_descent=True, autotune=True, fused_qkv=True)

    @classmethod
    def parse(cls, names: Iterable[str]) -> Tuning:
        """The options named (field names, comma-separated or one per item; ``"all"``: :meth:`full`)."""
        parts = [part.strip() for name in names for part in name.split(",") if part.strip()]
        if "all" in parts:
            return cls.full()
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(parts) - set(valid))
        if unknown:
            raise SettingsError(
                f"tuning options {', '.join(map(repr, unknown))} are unknown; choose from all, {', '.join(valid)}."
            )
        return cls(**dict.fromkeys(parts, True))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Tuning:
        """The tuning a manifest records (absent: the defaults, as engines exported before tuning)."""
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SettingsError(
                f"tuning options {', '.join(unknown)} are unknown to this accel; re-export the engines."
            )
        return cls(**data)

    def to_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)

    def inductor_options(self) -> dict[str, bool]:
        """The inductor configuration these options set (empty: inductor's defaults)."""
        names = {
            "conv_1x1_as_mm": "conv_1x1_as_mm",
            "coordinate_descent": "coordinate_descent_tuning",
            "autotune": "max_autotune",
        }
        return {names[name]: True for name, on in self.to_dict().items() if on and name in names}

    def describe(self) -> str:
        """``"default"`` or the options that are on, comma-separated."""
        return ", ".join(name for name, on in self.to_dict().items() if on) or "default"


def _choice(name: str, value: object, valid: Collection[str]) -> None:
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
            ``"reference"`` (the published window guidance: guidance dropped, stages fed mixed conditioning;
            docs/concepts.md lists where it differs from the research code),
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
        check_count("devices", self.devices)
        check_count("num_nodes", self.num_nodes)
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
        check_world_size(self.devices, self.num_nodes)

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
