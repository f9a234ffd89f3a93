"""Plan files: how a denoiser is cut into pipeline stages, for which model, shape and devices.

A plan is versioned JSON written by ``accel plan`` and read by ``accel run`` / ``accel.wrap(plan=...)``.
It names its model source (so nothing else is needed to run it), identifies the model by class, config
hash and a cheap weights fingerprint, and records the profiled costs, the stages (unit segments and the
module paths they own), the tensors crossing stage boundaries, and the run settings. A plan made for
another model, shape, device count or plan-format version is refused with the reason and the fix.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from accel.atomic import write_text_atomic
from accel.errors import AccelError
from accel.models.base import InputShape, TensorEdge, dtype_name, parameter_placement
from accel.models.fusion import is_fused_weight
from accel.partition import (
    DEFAULT_LINK_GBPS,
    LAYOUTS,
    PartitionError,
    Stage,
    check_stage_count,
    partition,
    stage_owners,
)
from accel.settings import PRECISIONS
from accel.source import SOURCE_FIELDS, SOURCE_KINDS, ModelSource
from accel.version import __version__

SCHEMA_VERSION = 1
FAMILIES = ("unet", "dit")


class PlanError(AccelError, ValueError):
    """A plan file is unreadable or does not fit; the message says what differs and how to fix it."""


def precision_name(dtype: torch.dtype | str) -> str:
    """``torch.float16`` or ``"fp16"`` -> ``"fp16"``."""
    if isinstance(dtype, str):
        if dtype not in PRECISIONS:
            raise PlanError(f"dtype {dtype!r} is not one of {', '.join(PRECISIONS)}.")
        return dtype
    for name, value in PRECISIONS.items():
        if value == dtype:
            return name
    raise PlanError(f"dtype {dtype} is not one of {', '.join(PRECISIONS)}.")


def config_hash(model: torch.nn.Module) -> str:
    """A hash of the model's architecture config (private ``_`` keys such as the diffusers version excluded)."""
    config = getattr(model, "config", None)
    if config is None:
        raise PlanError(f"{type(model).__name__} has no diffusers config to identify it by.")
    public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    blob = json.dumps(public, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module, samples: int = 64) -> str:
    """A cheap hash of the weights: every tensor's name, shape and dtype plus ``samples`` strided values.

    Re-initialised, fine-tuned or re-cast weights change it (every tensor of a fine-tune moves); an edit of
    a single element that the stride misses does not. It reads ~``samples`` values per tensor, so it costs
    milliseconds even for multi-GB models.
    """
    digest = hashlib.sha256()
    picks: dict[torch.device, list[torch.Tensor]] = {}
    order: list[torch.device] = []
    for name, tensor in sorted(model.state_dict().items()):
        if is_fused_weight(name):
            continue  # copies of the original projections: the same weights, fused or not
        digest.update(f"{name}:{tuple(tensor.shape)}:{dtype_name(tensor.dtype)};".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0 or flat.device.type == "meta":
            continue
        step = max(1, flat.numel() // samples)
        if flat.device not in picks:
            picks[flat.device] = []
            order.append(flat.device)
        picks[flat.device].append(flat[::step][:samples].to(torch.float64))
    for device in order:
        # One transfer per device instead of one per tensor.
        digest.update(torch.cat(picks[device]).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _fail(what: str, value: Any, expected: str) -> PlanError:
    return PlanError(f"plan field {what!r} is {value!r}; expected {expected}.")


def _int(what: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(what, value, f"an integer >= {minimum}")
    return value


def _float(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(what, value, "a number")
    return float(value)


def _str(what: str, value: Any, choices: Sequence[str] | None = None) -> str:
    if not isinstance(value, str) or (choices is not None and value not in choices):
        raise _fail(what, value, "one of " + ", ".join(map(repr, choices)) if choices else "a string")
    return value


@dataclass(frozen=True)
class PlanUnit:
    """A unit as profiled: name, the module paths it uses, median ms and FLOPs."""

    name: str
    module_paths: tuple[str, ...]
    ms: float
    flops: int = 0


def _source(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or value.get("kind") not in SOURCE_KINDS:
        raise _fail("source", value, "a dict whose 'kind' is one of " + ", ".join(SOURCE_KINDS))
    required = SOURCE_FIELDS[value["kind"]]
    if not isinstance(value.get(required), str):
        raise _fail(f"source.{required}", value.get(required), "a string")
    return dict(value)


def _edge(value: Any, index: int) -> TensorEdge:
    if isinstance(value, TensorEdge):
        return value
    if not isinstance(value, Mapping):
        raise _fail(f"boundary[{index}]", value, "an object")
    try:
        return TensorEdge(
            name=_str(f"boundary[{index}].name", value["name"]),
            producer=_int(f"boundary[{index}].producer", value["producer"]),
            consumer=_int(f"boundary[{index}].consumer", value["consumer"]),
            shape=tuple(_int(f"boundary[{index}].shape", d) for d in value["shape"]),
            dtype=_str(f"boundary[{index}].dtype", value["dtype"]),
            nbytes=_int(f"boundary[{index}].nbytes", value["nbytes"]),
        )
    except (KeyError, TypeError) as exc:
        raise PlanError(f"plan field 'boundary[{index}]' is malformed ({exc!r}).") from exc


def _unit(value: Any, index: int) -> PlanUnit:
    if isinstance(value, PlanUnit):
        return value
    if not isinstance(value, Mapping):
        raise _fail(f"units[{index}]", value, "an object")
    try:
        return PlanUnit(
            name=_str(f"units[{index}].name", value["name"]),
            module_paths=tuple(_str(f"units[{index}].module_paths", p) for p in value["module_paths"]),
            ms=_float(f"units[{index}].ms", value["ms"]),
            flops=_int(f"units[{index}].flops", value.get("flops", 0)),
        )
    except (KeyError, TypeError) as exc:
        raise PlanError(f"plan field 'units[{index}]' is malformed ({exc!r}).") from exc


def _stage(value: Any, index: int) -> Stage:
    if isinstance(value, Stage):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise _fail(f"stages[{index}]", value, "an object")
    what = f"stages[{index}]"
    try:
        segments = []
        for seg in value["segments"]:
            if not isinstance(seg, Sequence) or isinstance(seg, str) or len(seg) != 2:
                raise _fail(f"{what}.segments", value["segments"], "a list of [lo, hi] pairs")
            segments.append((_int(f"{what}.segments", seg[0]), _int(f"{what}.segments", seg[1])))
        return Stage(
            segments=segments,
            module_paths=tuple(_str(f"{what}.module_paths", p) for p in value["module_paths"]),
            cost_ms=_float(f"{what}.cost_ms", value["cost_ms"]),
            compute_ms=_float(f"{what}.compute_ms", value["compute_ms"]),
            comm_ms=_float(f"{what}.comm_ms", value.get("comm_ms", 0.0)),
            bytes_in=_int(f"{what}.bytes_in", value.get("bytes_in", 0)),
            bytes_out=_int(f"{what}.bytes_out", value.get("bytes_out", 0)),
            flops=_int(f"{what}.flops", value.get("flops", 0)),
        )
    except (KeyError, TypeError) as exc:
        raise PlanError(f"plan field '{what}' is malformed (missing or wrong {exc!r}).") from exc


def _pair(what: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise _fail(what, value, "a [height, width] pair")
    return _int(what, value[0], 1), _int(what, value[1], 1)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A validated plan (see the module docstring); make one with :func:`build_plan`.

    Attributes:
        source: where the model comes from: ``{"kind": "folder", "path": ...}``, ``{"kind": "hub",
            "id": ...}``, ``{"kind": "demo", "name": "sdxl"}`` or ``{"kind": "arch", "name":
            "sdxl-base-1.0", "seed": 0}``.
        model_class, family, config_hash, weights_fingerprint: what the plan was made for.
        dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"``; ``device_type``: ``"cuda"`` or ``"cpu"``.
        resolutions: ``(height, width)`` pixel buckets; ``batches``: per-branch batch buckets.
        devices: number of stages (one device each).
        layout: ``"chain"`` or ``"onion"``; ``link_gbps``: the link bandwidth (GB/s) assumed.
        units: every unit with its measured cost; ``stages``: one per device; ``boundary``: the tensors
            crossing stages once per step (``bytes_per_step`` in total); ``balance``: max/mean stage cost.
        schedule: switching settings for the runtime (empty: its defaults); ``strategy``, ``backend``.
        profile: how costs were measured (timer, warm-up, repeats, device name, versions).
    """

    schema_version: int = SCHEMA_VERSION
    source: dict[str, Any]
    model_class: str
    family: str
    config_hash: str
    weights_fingerprint: str
    dtype: str
    device_type: str
    resolutions: tuple[tuple[int, int], ...]
    batches: tuple[int, ...]
    devices: int
    layout: str
    link_gbps: float
    units: tuple[PlanUnit, ...]
    stages: tuple[Stage, ...]
    boundary: tuple[TensorEdge, ...] = ()
    bytes_per_step: int = 0
    balance: float = 1.0
    schedule: dict[str, Any] = field(default_factory=dict)
    strategy: str = "hybrid"
    backend: str = "eager"
    profile: dict[str, Any] = field(default_factory=dict)
    accel_version: str = ""
    created: str = ""

    def __post_init__(self) -> None:
        # Normalise JSON lists and in-memory tuples alike, so that a loaded plan equals the saved one.
        set_ = object.__setattr__
        if self.schema_version != SCHEMA_VERSION:
            raise PlanError(
                f"plan schema_version {self.schema_version!r} is not {SCHEMA_VERSION}, the version this accel "
                "reads; re-run `accel plan ...` with this accel to make a new plan."
            )
        set_(self, "source", _source(self.source))
        for name in ("model_class", "config_hash", "weights_fingerprint", "accel_version", "created"):
            _str(name, getattr(self, name))
        _str("family", self.family, FAMILIES)
        _str("dtype", self.dtype, tuple(PRECISIONS))
        _str("device_type", self.device_type, ("cuda", "cpu"))
        _str("layout", self.layout, LAYOUTS)
        _str("strategy", self.strategy)
        _str("backend", self.backend)
        if not isinstance(self.resolutions, Sequence) or not self.resolutions:
            raise _fail("resolutions", self.resolutions, "a non-empty list of [height, width] pairs")
        set_(self, "resolutions", tuple(_pair("resolutions", r) for r in self.resolutions))
        if not isinstance(self.batches, Sequence) or not self.batches:
            raise _fail("batches", self.batches, "a non-empty list of batch sizes")
        set_(self, "batches", tuple(_int("batches", b, 1) for b in self.batches))
        _int("devices", self.devices, 1)
        set_(self, "link_gbps", _float("link_gbps", self.link_gbps))
        for name in ("units", "stages", "boundary"):
            if not isinstance(getattr(self, name), Sequence):
                raise _fail(name, getattr(self, name), "a list")
        set_(self, "units", tuple(_unit(u, i) for i, u in enumerate(self.units)))
        set_(self, "stages", tuple(_stage(s, i) for i, s in enumerate(self.stages)))
        set_(self, "boundary", tuple(_edge(e, i) for i, e in enumerate(self.boundary)))
        _int("bytes_per_step", self.bytes_per_step)
        set_(self, "balance", _float("balance", self.balance))
        for name in ("schedule", "profile"):
            if not isinstance(getattr(self, name), Mapping):
                raise _fail(name, getattr(self, name), "an object")
            set_(self, name, dict(getattr(self, name)))
        if len(self.stages) != self.devices:
            raise PlanError(
                f"the plan has {len(self.stages)} stages but devices={self.devices}; the file is inconsistent "
                "(edited by hand?). Re-run `accel plan ...`."
            )
        try:
            stage_owners([s.segments for s in self.stages], len(self.units))
        except PartitionError as exc:
            raise PlanError(f"{exc} The file is inconsistent; re-run `accel plan ...`.") from None

    # -- derived --------------------------------------------------------------------------------
    def stage_of_units(self) -> list[int]:
        """For each unit index, the stage that runs it."""
        return stage_owners([s.segments for s in self.stages], len(self.units))

    def replan_command(
        self,
        *,
        height: int | None = None,
        width: int | None = None,
        batch: int | None = None,
        devices: int | None = None,
        dtype: str | None = None,
    ) -> str:
        """The ``accel plan`` command that makes a plan like this one (with some settings changed)."""
        model = ModelSource.from_dict(self.source).command_argument
        h, w = self.resolutions[0]
        return (
            f"accel plan {model} --height {height or h} --width {width or w} --devices {devices or self.devices} "
            f"--batch {batch or self.batches[0]} --dtype {dtype or self.dtype} --device {self.device_type} -o plan.json"
        )

    def shapes(self, device: torch.device | str, dtype: torch.dtype | None = None) -> list[InputShape]:
        """Every shape bucket of the plan (resolution x batch) on ``device``, in ``dtype`` (default: the plan's)."""
        return [
            InputShape(
                batch=batch,
                height=height,
                width=width,
                dtype=PRECISIONS[self.dtype] if dtype is None else dtype,
                device=torch.device(device),
                text_len=self.profile.get("text_len"),
                vae_scale_factor=int(self.profile.get("vae_scale_factor", 8)),
            )
            for height, width in self.resolutions
            for batch in self.batches
        ]

    # -- checks ---------------------------------------------------------------------------------
    def validate_for(
        self,
        model: torch.nn.Module,
        *,
        height: int | None = None,
        width: int | None = None,
        batch: int | None = None,
        devices: int | None = None,
        dtype: torch.dtype | str | None = None,
        check_weights: bool = True,
    ) -> None:
        """Refuse (``PlanError``) a plan that was not made for this model, shape, batch, device count or dtype.

        Every difference is listed, followed by the ``accel plan`` command that makes a fitting plan.
        """
        from accel.models import UnsupportedModelError, adapt

        problems: list[str] = []
        placement = parameter_placement(model)
        # The weights fingerprint samples values, which a cast changes: in another precision the dtype
        # problem below is the one to report, not a weights difference.
        same_dtype = placement is None or placement[1] == PRECISIONS[self.dtype]
        if type(model).__name__ != self.model_class:
            problems.append(f"the plan is for a {self.model_class}, the model is a {type(model).__name__}")
        elif config_hash(model) != self.config_hash:
            problems.append("the model's config differs from the one the plan was made for (config hash)")
        else:
            try:
                names = [u.name for u in adapt(model).units]
            except UnsupportedModelError as exc:
                problems.append(str(exc))
            else:
                if names != [u.name for u in self.units]:
                    problems.append(
                        "this accel cuts the model into different units than the plan lists "
                        f"(plan made by accel {self.accel_version or 'unknown'})"
                    )
            if check_weights and same_dtype and weights_fingerprint(model) != self.weights_fingerprint:
                problems.append(
                    "the model's weights differ from the ones the plan was made for (weights fingerprint)"
                )
        model_dtype = placement[1] if placement is not None else None
        wanted = precision_name(dtype) if dtype is not None else None
        if wanted is None and model_dtype is not None and model_dtype in PRECISIONS.values():
            wanted = precision_name(model_dtype)
        if wanted is not None and wanted != self.dtype:
            problems.append(f"the plan was profiled in {self.dtype}, this run uses {wanted}")
        if height is not None or width is not None:
            h0, w0 = self.resolutions[0]
            shape = (height or h0, width or w0)
            if shape not in self.resolutions:
                buckets = ", ".join(f"{h}x{w}" for h, w in self.resolutions)
                problems.append(f"resolution {shape[0]}x{shape[1]} is not in the plan's buckets ({buckets})")
        if batch is not None and batch not in self.batches:
            problems.append(f"batch {batch} is not in the plan's batch buckets {list(self.batches)}")
        if devices is not None and devices != self.devices:
            problems.append(
                f"the plan has {self.devices} stages for {self.devices} devices, this run has {devices}"
            )
        if problems:
            fix = self.replan_command(height=height, width=width, batch=batch, devices=devices, dtype=wanted)
            raise PlanError(
                "this plan does not fit: "
                + "; ".join(problems)
                + f". Fix: re-run `{fix}` for this model and shape."
            )

    # -- files ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``schema_version`` first)."""
        data = dataclasses.asdict(self)
        for stage in data["stages"]:
            stage["segments"] = [list(seg) for seg in stage["segments"]]
        data["resolutions"] = [list(r) for r in self.resolutions]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Validate a dict (as read from JSON) into a plan; ``PlanError`` names the offending field."""
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}.")
        if "schema_version" not in data:
            raise PlanError("this JSON has no 'schema_version': it is not an accel plan file.")
        if data["schema_version"] != SCHEMA_VERSION:
            raise PlanError(
                f"plan schema_version {data['schema_version']!r} is not {SCHEMA_VERSION}, the version this accel "
                "reads; re-run `accel plan ...` with this accel to make a new plan."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(
                f"unknown plan field(s) {', '.join(unknown)}; was the file made by a newer accel?"
            )
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise PlanError(f"the plan is missing field(s) {', '.join(missing)}; re-run `accel plan ...`.")
        try:
            return cls(**dict(data))
        except PlanError:
            raise
        except (TypeError, ValueError) as exc:
            raise PlanError(f"the plan is malformed: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON atomically (temp file + rename: readers never see half a file)."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan file; any problem is a ``PlanError`` that names the file and the cause."""
    target = Path(path)
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        raise PlanError(f"no plan file at {target}; make one with `accel plan MODEL -o {target}`.") from None
    except OSError as exc:
        raise PlanError(f"cannot read plan file {target}: {exc.strerror or exc}.") from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PlanError(f"{target} is not a plan file (not UTF-8 text: {exc.reason}).") from None
    except json.JSONDecodeError as exc:
        where = "it is empty" if not raw.strip() else f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
        raise PlanError(
            f"{target} is not valid JSON ({where}); the file is truncated or corrupt. "
            "Re-create it with `accel plan ...`."
        ) from None
    try:
        return Plan.from_dict(data)
    except PlanError as exc:
        raise PlanError(f"{target}: {exc}") from None


def now_utc() -> str:
    """Creation timestamp for plans (ISO 8601, UTC, seconds)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def build_plan(
    model: torch.nn.Module,
    *,
    source: Mapping[str, Any],
    height: int,
    width: int,
    devices: int,
    batch: int = 1,
    more_batches: Sequence[int] = (),
    vae_scale_factor: int = 8,
    text_len: int | None = None,
    layout: str = "auto",
    link_gbps: float | None = None,
    warmup: int = 3,
    repeat: int = 10,
    count_flops: bool = True,
    schedule: Mapping[str, Any] | None = None,
    strategy: str = "hybrid",
    backend: str = "eager",
) -> Plan:
    """Profile ``model`` where it lives (device and dtype), partition it for ``devices`` and record a plan.

    ``batch`` is the per-device batch of a CFG-split step (one guidance branch), the one profiled;
    ``more_batches`` are further batch buckets the plan covers (``accel export`` writes engines for each,
    ``accel serve`` batches requests to these sizes); ``height``/``width`` are pixels. ``source`` says how ``accel run`` gets the model back (see :class:`Plan`).
    """
    from accel.models import adapt
    from accel.profile import profile_units

    placement = parameter_placement(model)
    if placement is None:
        raise PlanError(f"{type(model).__name__} has no floating-point parameters to profile.")
    device, dtype = placement
    precision = precision_name(dtype)
    adapter = adapt(model)
    check_stage_count(len(adapter.units), devices)  # before profiling, which takes a while
    shape = InputShape(
        batch=batch,
        height=height,
        width=width,
        dtype=dtype,
        device=device,
        text_len=text_len,
        vae_scale_factor=vae_scale_factor,
    )
    measured = profile_units(adapter, shape, warmup=warmup, repeat=repeat, count_flops=count_flops)
    link = DEFAULT_LINK_GBPS if link_gbps is None else link_gbps
    cut = partition(measured.costs, devices, measured.edges, adapter.family, link, layout)
    units = [
        PlanUnit(name=u.name, module_paths=u.module_paths, ms=c.ms, flops=c.flops)
        for u, c in zip(adapter.units, measured.units, strict=True)
    ]
    stages = []
    for stage in cut.stages:
        indices = stage.units()
        paths = dict.fromkeys(p for i in indices for p in units[i].module_paths)
        flops = sum(units[i].flops for i in indices)
        stages.append(dataclasses.replace(stage, module_paths=tuple(paths), flops=flops))
    import diffusers

    return Plan(
        source=dict(source),
        model_class=type(model).__name__,
        family=adapter.family,
        config_hash=config_hash(model),
        weights_fingerprint=weights_fingerprint(model),
        dtype=precision,
        device_type=device.type if device.type in ("cuda", "cpu") else "cpu",
        resolutions=((height, width),),
        batches=(batch, *sorted(set(more_batches) - {batch})),
        devices=devices,
        layout=cut.layout,
        link_gbps=link,
        units=tuple(units),
        stages=tuple(stages),
        boundary=tuple(cut.boundary),
        bytes_per_step=cut.bytes_per_step,
        balance=cut.balance,
        schedule=dict(schedule or {}),
        strategy=strategy,
        backend=backend,
        profile={
            "timer": measured.timer,
            "warmup": measured.warmup,
            "repeat": measured.repeat,
            "device_name": measured.device_name,
            "text_len": text_len,
            "vae_scale_factor": vae_scale_factor,
            "prepare_ms": measured.prepare_ms,
            "context_module_paths": list(adapter.context_module_paths),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        accel_version=__version__,
        created=now_utc(),
    )
