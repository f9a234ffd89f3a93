"""Engine directory: one file per (phase, stage, shape bucket) plus ``manifest.json``.

>>> store = EngineStore("engines/")
>>> store.export("window.s0.u0-4.128x128.b1", "aot", stage, example_inputs)   # compiles once
>>> fn = store.load("window.s0.u0-4.128x128.b1", "aot", stage, example_inputs)  # validated, no compile

Each manifest entry records the backend, the file's sha256 and size, the stage's graph fingerprint
(structure, parameter shapes and inputs; independent of weight values), the weights fingerprint
(:func:`accel.plan.weights_fingerprint`), the input shapes/dtypes, the device type and CUDA compute
capability, and the torch / diffusers / backend versions.

Graph identity and weights identity are kept apart. Everything but the weights fingerprint describes the
compiled graph (structure, shapes, dtypes, device, versions): any difference there is refused. A
weights difference is refused only for backends that hold their own copy of the weights (``onnx``,
``tensorrt``); backends that read the module's own parameters when they run (``aot`` packages, which
hold code only, ``inductor``, ``eager``: :attr:`Backend.binds_weights`) serve a fine-tune or a fused
LoRA of the same architecture without recompiling, and the difference is reported (a log warning, and
:meth:`EngineStore.check`'s notes). :meth:`EngineStore.validate` checks all of it before anything is
loaded and refuses with every reason; ``rebuild=True`` recompiles instead.
Engines of the tunable backends (``inductor``, ``aot``) record the tuning they were built with
(``extra["tuning"]``, :class:`accel.settings.Tuning`): a run loads an engine with its own tuning, and an
export asked for other tuning rebuilds it. An export's tuning budget (``tune_budget_s``) builds a stage
whose searches run past it without them, recording the tuning asked for and why (``tuning_asked``,
``tuning_note``); the same request keeps that engine.
Each entry also carries a digest of its own fields (``extra["digest"]``), so an edited manifest entry is
refused too, and an export of a plan first records the keys it will write (``expected``), so an
interrupted export is known as incomplete. Writes are atomic (temp file + ``os.replace``) and exports hold
a lock on the directory (``fcntl.flock``; no lock file is left behind).

Engine files can contain executable code (shared libraries, generated code): load only from a
directory you created or trust. Nothing here uses pickle; no ``torch.load`` is involved.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from accel.atomic import acquire_flock, write_text_atomic
from accel.compile.backends import Backend, StageCallable, get_backend
from accel.compile.budget import exceeded, time_budget
from accel.compile.stage import TensorSpec, stage_model
from accel.errors import AccelError
from accel.models import fusion
from accel.models.base import dtype_name
from accel.settings import SettingsError, Tuning

MANIFEST = "manifest.json"
#: The lock file of older accel versions (the directory itself is locked now); inspect ignores it.
LOCK = ".lock"
FORMAT_VERSION = 1
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

log = logging.getLogger(__name__)


class EngineError(AccelError, RuntimeError):
    """An engine cannot be used (or written); the message gives every reason and the fix."""


@dataclass(frozen=True)
class EngineRecord:
    """One manifest entry (see the module docstring)."""

    key: str
    file: str
    backend: str
    sha256: str
    size: int
    graph_fingerprint: str
    weights_fingerprint: str
    inputs: list[dict[str, Any]]
    device_type: str
    compute_capability: str | None
    versions: dict[str, str | None]
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineRecord:
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(n for n in names - set(data) if n not in ("created", "extra"))
        if missing:
            raise EngineError(f"manifest entry {data.get('key')!r} lacks {', '.join(missing)}; re-export.")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class EngineCheck:
    """Whether engine ``key`` fits a stage here: ``problems`` refuse it (graph, environment, file),
    ``notes`` do not (other weights, for a backend that binds the module's own weights at load)."""

    key: str
    record: EngineRecord | None
    problems: list[str]
    notes: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems


#: ``extra[WEIGHTS] == BOUND``: the engine reads the module's own weights when it runs (see ``binds_weights``).
WEIGHTS = "weights"
BOUND = "bound at load"
#: ``extra`` key of the tuning a tunable backend built the engine with (:class:`accel.settings.Tuning`)
TUNING = "tuning"
#: ``extra`` keys of an engine built without its searches because they ran past the export's budget:
#: the tuning asked for, and why it was not used
TUNING_ASKED = "tuning_asked"
TUNING_NOTE = "tuning_note"
#: ``extra`` key of the wall-clock seconds the export of the engine took
BUILD_S = "build_s"


def binds_weights(record: EngineRecord) -> bool:
    """Whether the engine serves any weights of its graph: its backend binds the module's own weights at
    load, and the export recorded so (engines written before that was recorded may hold some weights)."""
    try:
        backend_binds = get_backend(record.backend).binds_weights
    except ValueError:  # a backend this accel does not know
        return False
    return backend_binds and record.extra.get(WEIGHTS) == BOUND


def record_digest(data: dict[str, Any]) -> str:
    """Hash of a manifest entry's fields (``extra`` aside): any later edit of the entry changes it."""
    fields = {k: v for k, v in data.items() if k != "extra"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def engine_file_name(key: str, backend: Backend) -> str:
    """``<key>.<backend><suffix>``, without repeating a suffix that is the backend's name (``.onnx``)."""
    if backend.suffix == f".{backend.name}":
        return f"{key}{backend.suffix}"
    return f"{key}.{backend.name}{backend.suffix}"


# -- identities ---------------------------------------------------------------------------------------
def input_specs(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """Name, shape and dtype of every input (names from the stage module when it has them)."""
    names = list(getattr(module, "input_names", ())) or [f"input_{i}" for i in range(len(example_inputs))]
    return [TensorSpec.of(n, t).to_dict() for n, t in zip(names, example_inputs, strict=True)]


def record_tuning(record: EngineRecord) -> Tuning:
    """The tuning an engine was built with (defaults for engines that record none)."""
    try:
        return Tuning.from_dict(record.extra.get(TUNING))
    except SettingsError as exc:
        raise EngineError(f"engine {record.key!r}: {exc}") from None


def describe_tuning(tuning: Tuning, note: str | None = None) -> str:
    """``tuning`` in words, and whether its searches were dropped past an export's budget (``note``)."""
    return tuning.describe() + (" (searches past the export's budget)" if note else "")


def _tuning_or_none(record: EngineRecord) -> Tuning | None:
    try:
        return record_tuning(record)
    except EngineError:  # options unknown to this accel: rebuilt
        return None


def _answers(record: EngineRecord, tuning: Tuning) -> bool:
    """Whether the engine answers an export asking for ``tuning``: built with it, or built without its
    searches after they ran past the budget of an export that asked for the same."""
    if _tuning_or_none(record) == tuning:
        return True
    try:
        return TUNING_ASKED in record.extra and Tuning.from_dict(record.extra[TUNING_ASKED]) == tuning
    except SettingsError:
        return False


def _fuse_for(key: str, module: torch.nn.Module) -> None:
    """Fuse the q/k/v projections of the stage's model for engine ``key`` (:mod:`accel.models.fusion`)."""
    model = stage_model(module)
    try:
        fused_now = fusion.fuse(model)
    except fusion.FusionError as exc:
        raise EngineError(f"engine {key!r} has fused q/k/v projections: {exc}") from None
    if fused_now:
        log.info("engine %r: fused the q/k/v projections of %s", key, type(model).__name__)


def graph_fingerprint(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> str:
    """Hash of the stage's structure: module tree, parameter names/shapes/dtypes and inputs, no values."""
    signature = getattr(module, "graph_signature", None)
    if callable(signature):
        text = signature()
    else:
        blob = {
            "modules": [f"{n}:{type(m).__name__}" for n, m in module.named_modules()],
            "parameters": [(n, list(p.shape), dtype_name(p.dtype)) for n, p in module.named_parameters()],
            "buffers": [(n, list(b.shape), dtype_name(b.dtype)) for n, b in module.named_buffers()],
            "inputs": input_specs(module, example_inputs),
        }
        text = json.dumps(blob, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def module_weights_fingerprint(module: torch.nn.Module) -> str:
    """The weights fingerprint of the stage's model (equal to the plan's for a stage module)."""
    from accel.plan import weights_fingerprint

    return weights_fingerprint(stage_model(module))


def device_of(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> torch.device:
    for tensor in (*example_inputs, *module.parameters()):
        return tensor.device
    return torch.device("cpu")


def compute_capability(device: torch.device) -> str | None:
    """``"sm_90"`` for a CUDA device, ``None`` elsewhere."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def versions(backend: Backend) -> dict[str, str | None]:
    try:
        import diffusers

        diffusers_version: str | None = diffusers.__version__
    except ImportError:  # pragma: no cover - diffusers is a dependency
        diffusers_version = None
    return {"torch": torch.__version__, "diffusers": diffusers_version, backend.name: backend.version()}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


class EngineStore:
    """An engine directory the user named (nothing is ever loaded from anywhere else)."""

    def __init__(self, directory: str | os.PathLike[str], *, lock_timeout: float = 600.0) -> None:
        self.directory = Path(directory)
        self.lock_timeout = lock_timeout

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    # -- manifest -----------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        """The manifest (an empty one when the directory has none yet)."""
        path = self.manifest_path
        if not path.exists():
            return {"format": FORMAT_VERSION, "engines": {}}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EngineError(
                f"{path} is not valid JSON ({exc}); the manifest is truncated or corrupt. Re-export with "
                "`accel export ... --rebuild`."
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise EngineError(
                f"{path} has manifest format {data.get('format') if isinstance(data, dict) else None!r}, this "
                f"accel reads format {FORMAT_VERSION}; re-export with `accel export ... --rebuild`."
            )
        if not isinstance(data.get("engines"), dict):
            raise EngineError(f"{path} has no 'engines' table; re-export with `accel export ... --rebuild`.")
        return data

    def records(self) -> dict[str, EngineRecord]:
        return {k: EngineRecord.from_dict(v) for k, v in self.read_manifest()["engines"].items()}

    def expect(self, keys: Sequence[str]) -> None:
        """Record the keys an export is about to write, so that :meth:`missing` can name the ones it did not."""
        with self.lock():
            manifest = self.read_manifest()
            manifest["expected"] = sorted(set(keys))
            write_text_atomic(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def missing(self) -> list[str]:
        """Keys the last export of a plan meant to write that the manifest lacks (an interrupted export)."""
        manifest = self.read_manifest()
        return sorted(set(manifest.get("expected", [])) - set(manifest["engines"]))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock on the directory (one export at a time); ``EngineError`` after the timeout.

        The directory itself is locked, so no lock file is left in it.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory
        fd = os.open(path, os.O_RDONLY)
        try:
            if not acquire_flock(fd, self.lock_timeout):
                raise EngineError(
                    f"another export has held the lock on {path} for more than {self.lock_timeout:g} s; "
                    "wait for it to finish (or pass a longer lock timeout)."
                )
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def entry_problems(self, key: str) -> list[str]:
        """What is wrong with the manifest entry ``key`` itself: edited after export (its digest)."""
        entry = self.read_manifest()["engines"].get(key, {})
        digest = entry.get("extra", {}).get("digest") if isinstance(entry.get("extra"), dict) else None
        if digest is not None and digest != record_digest(entry):
            return ["manifest entry edited after export (its digest does not match)"]
        return []

    def reexport_command(self, backend: str | None = None) -> str:
        """The `accel export` that mends this directory: the backend (else the engines' own) and the
        union of the engines' tuning options (a decoder engine never has ``fused_qkv``). Without
        ``--rebuild`` it rewrites only the engines that do not fit and keeps the others."""
        try:
            records = list(self.records().values())
        except EngineError:  # an unreadable manifest: the command still names the directory
            records = []
        name = backend or next(iter(sorted({r.backend for r in records})), "BACKEND")
        tunings = [t for t in map(_tuning_or_none, records) if t is not None]
        options = sorted({option for t in tunings for option, on in t.to_dict().items() if on})
        tune = f" --tune {','.join(options)}" if options else ""
        return f"accel export PLAN --backend {name}{tune} -o {self.directory}"

    # -- checks -------------------------------------------------------------------------------------
    def expected(
        self,
        backend: Backend,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        device: str | torch.device | None = None,
    ) -> dict[str, Any]:
        """What a fitting record must say for this backend, stage and inputs, in this environment.

        ``device``: where the stage will run, for a stage given on the meta device (its graph without its
        weights; the weights fingerprint is then ``None``: unknown).
        """
        where = device_of(module, example_inputs)
        structure_only = where.type == "meta"
        if structure_only:
            if device is None:
                raise ValueError("a stage on the meta device needs device=: where it will run.")
            where = torch.device(device)
            if where.type == "cuda" and where.index is None:
                where = torch.device("cuda", torch.cuda.current_device())
        return {
            "backend": backend.name,
            "graph_fingerprint": graph_fingerprint(module, example_inputs),
            "weights_fingerprint": None if structure_only else module_weights_fingerprint(module),
            "inputs": input_specs(module, example_inputs),
            "device_type": where.type,
            "compute_capability": compute_capability(where),
            "versions": versions(backend),
        }

    def check(
        self,
        key: str,
        backend: str | Backend,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        device: str | torch.device | None = None,
    ) -> EngineCheck:
        """What refuses engine ``key`` for this stage here (``problems``) and what is only reported
        (``notes``: built for other weights, which this backend binds at load). A stage on the meta
        device (``device``: where it will run) is checked for everything but its weights. For an engine
        built with fused q/k/v projections the stage's model is fused first, as a load needs it."""
        impl = get_backend(backend)
        engines = self.read_manifest()["engines"]
        if key not in engines:
            return EngineCheck(key, None, [f"no engine {key!r} in {self.manifest_path}"], [])
        record = EngineRecord.from_dict({**engines[key], "key": key})
        problems: list[str] = self.entry_problems(key)
        tuning = _tuning_or_none(record)
        if tuning is None:
            problems.append(f"built with tuning this accel does not know ({record.extra.get(TUNING)})")
        elif tuning.fused_qkv:
            # The engine holds the fused graph: the stage's model is fused the same way (once) before it is
            # compared and bound.
            _fuse_for(key, module)
        want = self.expected(impl, module, example_inputs, device=device)
        notes: list[str] = []
        if record.backend != want["backend"]:
            problems.append(f"built with backend {record.backend!r}, this run uses {want['backend']!r}")
        if want["weights_fingerprint"] is None:
            pass  # weights not read (a structure check): the loading process compares them
        elif record.weights_fingerprint != want["weights_fingerprint"]:
            weights = (
                f"built for other weights (weights fingerprint differs: built {record.weights_fingerprint}, "
                f"now {want['weights_fingerprint']})"
            )
            if binds_weights(record):
                notes.append(
                    f"{weights}; a {impl.name} engine reads the module's own weights when it runs, so it "
                    "serves these without recompiling"
                )
            elif impl.binds_weights:
                problems.append(
                    f"{weights}; this {impl.name} engine was exported by an earlier accel, which did not keep "
                    "every weight out of the engine"
                )
            else:
                problems.append(f"{weights}; a {impl.name} engine holds its own copy of the weights")
        if record.inputs != want["inputs"]:
            problems.append(f"shapes differ: {_shape_diff(record.inputs, want['inputs'])}")
        elif record.graph_fingerprint != want["graph_fingerprint"]:
            problems.append(
                "the stage's graph differs (other model structure, unit range or fixed arguments)"
            )
        if record.device_type != want["device_type"]:
            problems.append(f"built for {record.device_type}, this run is on {want['device_type']}")
        elif record.compute_capability != want["compute_capability"]:
            problems.append(f"built for {record.compute_capability}, this is {want['compute_capability']}")
        for lib, version in want["versions"].items():
            built = record.versions.get(lib)
            if built != version:
                problems.append(f"built with {lib} {built}, this is {version}")
        path = self.directory / record.file
        if Path(record.file).name != record.file:
            problems.append(f"the manifest names file {record.file!r} outside the engine directory")
        elif not path.is_file():
            problems.append(f"file {path} is missing")
        else:
            size = path.stat().st_size
            if size < record.size:
                problems.append(f"file {path} truncated ({size} of {record.size} bytes): checksum mismatch")
            elif sha256_file(path) != record.sha256:
                problems.append(f"file {path} edited: checksum mismatch")
        return EngineCheck(key, record, problems, notes)

    def problems(
        self,
        key: str,
        backend: str | Backend,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        device: str | torch.device | None = None,
    ) -> list[str]:
        """Every reason the engine ``key`` cannot be used for this stage here (empty: it fits)."""
        return self.check(key, backend, module, example_inputs, device=device).problems

    def validate(
        self,
        key: str,
        backend: str | Backend,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
    ) -> EngineRecord:
        """The record of engine ``key`` if it fits this stage here; otherwise ``EngineError`` with reasons.

        What fits but differs (other weights bound at load) is logged as a warning.
        """
        found = self.check(key, backend, module, example_inputs)
        if found.problems:
            command = self.reexport_command(get_backend(backend).name)
            raise EngineError(
                f"engine {key!r} in {self.directory} cannot be used: "
                + "; ".join(found.problems)
                + f". Fix: re-export (`{command}`, which rewrites only the engines that do not fit) or pass "
                "rebuild=True."
            )
        for note in found.notes:
            log.warning("engine %r in %s: %s.", key, self.directory, note)
        assert found.record is not None
        return found.record

    # -- export / load ------------------------------------------------------------------------------
    def export(
        self,
        key: str,
        backend: str | Backend,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        rebuild: bool = False,
        tune_budget_s: float | None = None,
    ) -> EngineRecord:
        """Write the engine for ``key`` (unless a fitting one exists and ``rebuild`` is False).

        ``tune_budget_s``: wall-clock seconds the backend's searches (coordinate descent, autotuning) may
        take; past it the engine is built without them (:meth:`Tuning.without_search`), and the record
        says which tuning was asked for and why it was not used. A later export asking for the same keeps
        that engine; ``rebuild=True`` (with a larger budget) tries again.
        """
        if not _KEY.match(key):
            raise ValueError(f"engine key {key!r} must match {_KEY.pattern} (it names a file).")
        impl = get_backend(backend)
        impl.check_available()
        with self.lock():
            kept = None if rebuild else self.records().get(key)
            if kept is not None:
                # Tuning first: checking an engine built fused would fuse the stage's model.
                if not _answers(kept, impl.tuning):
                    log.info(
                        "engine %r: built with other tuning; rebuilding with %s", key, impl.tuning.describe()
                    )
                elif not self.problems(key, impl, module, example_inputs):
                    if TUNING_NOTE in kept.extra:
                        log.info(
                            "engine %r: kept, built with %s (%s); --rebuild tries the tuning again",
                            key,
                            record_tuning(kept).describe(),
                            kept.extra[TUNING_NOTE],
                        )
                    return kept
            if impl.tuning.fused_qkv:
                _fuse_for(key, module)
            want = self.expected(impl, module, example_inputs)
            name = engine_file_name(key, impl)
            built, note = impl, None
            what = f"tuning engine {key!r} ({impl.tuning.describe()})"
            searches_bounded = (
                time_budget(tune_budget_s, what)
                if tune_budget_s is not None and impl.tuning.searches
                else contextlib.nullcontext()
            )
            started = time.perf_counter()
            try:
                with searches_bounded:
                    path = impl.export(module, example_inputs, self.directory / name)
            except Exception as exc:  # the budget's, possibly wrapped by the compiler
                over = exceeded(exc)
                if over is None:
                    raise
                built, note = impl.tuned(impl.tuning.without_search()), str(over)
                log.warning("%s Building it with %s instead.", note, built.tuning.describe())
                path = built.export(module, example_inputs, self.directory / name)
            record = EngineRecord(
                key=key,
                file=name,
                sha256=sha256_file(path),
                size=path.stat().st_size,
                created=_now(),
                extra={WEIGHTS: BOUND} if impl.binds_weights else {},
                **want,
            )
            # What the engine cost to build (a budget fallback included): told by `accel inspect`.
            record.extra[BUILD_S] = round(time.perf_counter() - started, 1)
            if impl.tunable:
                record.extra[TUNING] = built.tuning.to_dict()
            if note is not None:
                record.extra[TUNING_ASKED], record.extra[TUNING_NOTE] = impl.tuning.to_dict(), note
            record.extra["digest"] = record_digest(asdict(record))
            manifest = self.read_manifest()
            manifest["engines"][key] = asdict(record)
            write_text_atomic(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            return record

    def load(
        self,
        key: str,
        backend: str | Backend,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        rebuild: bool = False,
    ) -> StageCallable:
        """The validated engine ``key`` as a callable; ``rebuild=True`` re-exports one that does not fit."""
        impl = get_backend(backend)
        impl.check_available()
        if rebuild:
            self.export(key, impl, module, example_inputs)  # re-exports only what does not fit
        record = self.validate(key, impl, module, example_inputs)
        # Loaded as it was built: the tuning is the engine's, whatever the caller's backend was given.
        built = impl.tuned(record_tuning(record)) if impl.tunable else impl
        return built.load(self.directory / record.file, module=module)


def _shape_diff(built: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> str:
    b = {s["name"]: (tuple(s["shape"]), s["dtype"]) for s in built}
    w = {s["name"]: (tuple(s["shape"]), s["dtype"]) for s in wanted}
    parts = []
    for name in dict.fromkeys([*b, *w]):
        if b.get(name) != w.get(name):
            parts.append(f"{name} built {_fmt(b.get(name))}, now {_fmt(w.get(name))}")
    return ", ".join(parts) or "input order differs"


def _fmt(spec: tuple[tuple[int, ...], str] | None) -> str:
    if spec is None:
        return "absent"
    shape, dtype = spec
    return f"{list(shape)} {dtype}"
