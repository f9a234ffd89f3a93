"""Compiled stage callables at run time: made on first use per shape, or loaded from an engine directory.

:class:`StageRunner` is what the runtime asks for "the callable of stage ``key`` built from this module and
these inputs". It loads the engine from the directory given as ``engines=`` when one fits (the store
validates weights, shapes, versions and checksums first), and otherwise compiles in memory with the
per-stage fallback of :func:`accel.compile.backends.compile_stage`. On CUDA, every compiled callable
(not ``eager``, not ``onnx``) is replayed as a CUDA graph (:class:`CUDAGraphCallable`): at batch 1 the
denoiser is bound by kernel-launch overhead, which graph replay removes.

Counters (``compiled``, ``loaded``, ``fallbacks``, ``rebound``) say what happened, so that tests and
reports can check that a run from an engine directory compiled nothing.

Compiled stages read the module's weights through what they were bound to: a captured CUDA graph and an
AOTInductor package hold raw pointers, an onnx or TensorRT engine its own copy. Weights edited in place
keep their memory and are seen by the next call. Weights replaced by new tensors after binding
(``load_state_dict(..., assign=True)``, ``fuse_lora()`` on some versions, ``module.weight =
nn.Parameter(...)``, ``param.data = ...``) would be served stale: :meth:`StageRunner.check_weights`
(called before every pipeline call) finds them by identity and storage pointer, with no host
synchronisation, and binds the stage to the new tensors (an aot package loads its constants again, a CUDA
graph is captured again; no recompilation), or refuses with :class:`StaleWeightsError` when the
replacement changes the graph (other shape, dtype or device) or the backend holds its own weights.
"""

from __future__ import annotations

import logging
import operator
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.compile.backends import Backend, BackendError, StageCallable, compile_stage, get_backend
from accel.compile.stage import stage_model
from accel.compile.store import EngineError, EngineStore
from accel.compile.work import CompilerWork
from accel.models import fusion

log = logging.getLogger(__name__)

#: backends whose callables run as CUDA graphs on GPU (onnxruntime copies through the host; eager stays eager)
GRAPH_BACKENDS: tuple[str, ...] = ("inductor", "aot", "tensorrt")


class CUDAGraphCallable:
    """Replays ``fn`` as one CUDA graph: inputs are copied into static buffers, outputs are static buffers.

    The graph is captured on the first call (after ``warmup`` eager runs on a side stream, which also
    triggers any lazy compilation). Outputs are overwritten by the next call: a caller that keeps one
    across calls must copy it. The call has no host synchronisation: two device copies per input at most
    and one graph launch.
    """

    def __init__(self, fn: StageCallable, name: str, *, warmup: int = 2) -> None:
        self.fn = fn
        self.name = name
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.static_outputs: tuple[torch.Tensor, ...] = ()

    def rebind(self, module: torch.nn.Module) -> None:
        """Bind the wrapped callable to ``module``'s current tensors; the graph is captured again on the
        next call (it recorded the old tensors' addresses)."""
        rebind = getattr(self.fn, "rebind", None)
        if rebind is not None:
            rebind(module)
        self.graph = None

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.graph is None:
            self._capture(tensors)
        else:
            self._check(tensors)
        for static, tensor in zip(self.static_inputs, tensors, strict=True):
            if static.data_ptr() != tensor.data_ptr():
                static.copy_(tensor)
        assert self.graph is not None
        self.graph.replay()
        return self.static_outputs

    def _check(self, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(self.static_inputs):
            raise BackendError(
                f"stage {self.name}: called with {len(tensors)} inputs, its CUDA graph has "
                f"{len(self.static_inputs)}."
            )

    def _capture(self, tensors: Sequence[torch.Tensor]) -> None:
        device = tensors[0].device
        with torch.cuda.device(device), torch.no_grad():
            self.static_inputs = tuple(
                t.detach().clone(memory_format=torch.contiguous_format) for t in tensors
            )
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(*self.static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(*self.static_inputs)
            self.static_outputs = tuple(out) if not isinstance(out, torch.Tensor) else (out,)
            self.graph = graph
        log.info("stage %s: captured as a CUDA graph on %s", self.name, device)


class StaleWeightsError(BackendError):
    """Weights a compiled stage was bound to were replaced, and the stage cannot be bound to the new ones."""


class BoundWeights:
    """The parameters, buffers and submodules of a module as they are now, to find what was replaced since.

    :meth:`changed` compares each slot's current tensor object with the recorded one and, with
    ``storage``, its storage pointer (``param.data = ...`` keeps the object); with ``edits``, also the
    tensors' version counters, which in-place edits bump (for engines that hold their own copy of the
    weights). No device access, no host synchronisation.
    """

    def __init__(self, module: torch.nn.Module, *, storage: bool = True, edits: bool = False) -> None:
        self.storage = storage
        self.edits = edits
        self._tables: list[dict[str, Any]] = []
        self._names: list[str] = []
        self._paths: list[str] = []
        self._tensors: list[torch.Tensor] = []
        for prefix, sub in module.named_modules():
            for table in (sub._parameters, sub._buffers):
                for name, tensor in table.items():
                    if tensor is not None:
                        self._tables.append(table)
                        self._names.append(name)
                        self._paths.append(f"{prefix}.{name}" if prefix else name)
                        self._tensors.append(tensor)
        # Submodules too: a module swapped for another (say, an adapter wrapping a layer) leaves the old
        # module's parameter table as it was.
        self._children = [
            (sub._modules, name, child)
            for _, sub in module.named_modules()
            for name, child in sub._modules.items()
        ]
        self._specs = [(t.shape, t.dtype, t.device) for t in self._tensors]
        self._pointers = self._data_pointers() if storage else []
        self._versions = self._version_counters() if edits else []

    def _data_pointers(self) -> list[int]:
        return list(map(torch.Tensor.data_ptr, self._tensors))

    def _version_counters(self) -> list[int]:
        return [t._version for t in self._tensors]

    def changed(self) -> list[str]:
        """Names of what was replaced (or, with ``edits``, edited) since recording; empty if nothing."""
        current = list(map(dict.get, self._tables, self._names))
        same = all(map(operator.is_, current, self._tensors))
        same = same and all(operator.is_(table.get(name), child) for table, name, child in self._children)
        same = same and (not self.storage or self._data_pointers() == self._pointers)
        same = same and (not self.edits or self._version_counters() == self._versions)
        if same:
            return []
        changed = [
            path
            for path, now, then in zip(self._paths, current, self._tensors, strict=True)
            if now is not then
        ]
        if self.storage:
            pointers = zip(self._paths, self._tensors, self._pointers, strict=True)
            changed += [path for path, tensor, pointer in pointers if tensor.data_ptr() != pointer]
        if self.edits:
            versions = zip(self._paths, self._tensors, self._versions, strict=True)
            changed += [path for path, tensor, version in versions if tensor._version != version]
        changed += [
            f"{name} (submodule)" for table, name, child in self._children if table.get(name) is not child
        ]
        return list(dict.fromkeys(changed))

    def graph_changes(self, module: torch.nn.Module) -> list[str]:
        """What in ``module`` now differs from the bound tensors in a way the compiled graph cannot take:
        submodules swapped (stage adapters may hold the old ones), tensors gone, added, or of another
        shape, dtype or device."""
        swapped = [name for table, name, child in self._children if table.get(name) is not child]
        if swapped:
            return [f"submodule {', '.join(dict.fromkeys(swapped))} was replaced by another module"]
        now: dict[str, torch.Tensor] = dict(module.named_parameters())
        now.update(module.named_buffers())
        changes = [f"{p} is gone" for p in self._paths if p not in now]
        known = set(self._paths)
        changes += [f"{p} is new" for p in now if p not in known]
        for path, (shape, dtype, device) in zip(self._paths, self._specs, strict=True):
            tensor = now.get(path)
            if tensor is not None and (tensor.shape, tensor.dtype, tensor.device) != (shape, dtype, device):
                changes.append(
                    f"{path} was {list(shape)} {dtype} on {device}, now {list(tensor.shape)} {tensor.dtype} "
                    f"on {tensor.device}"
                )
        return changes


@dataclass
class _Bound:
    """A stage callable with the module and weights it is bound to."""

    key: str
    module: torch.nn.Module
    fn: StageCallable
    weights: BoundWeights


@dataclass
class RunnerCounts:
    """What a :class:`StageRunner` did: stages compiled in memory, loaded from engines, run eagerly,
    bound again to replaced weights, the seconds spent compiling or loading them and in their first calls
    (where ``torch.compile`` does its work lazily, and a CUDA graph is captured), and the compiler work
    counted meanwhile (:class:`CompilerWork`)."""

    compiled: int = 0
    loaded: int = 0
    fallbacks: int = 0
    rebound: int = 0
    seconds: float = 0.0
    first_call_seconds: float = 0.0
    work: CompilerWork = field(default_factory=CompilerWork)


class _FirstCallMeter:
    """Passes calls through to a stage callable; times the first one and counts the compiler's work in it
    (its lazy compilation, cache reads, kernel tuning, CUDA-graph capture), then reports it to the runner.
    Attributes (``rebind``) are the wrapped callable's."""

    def __init__(self, fn: StageCallable, key: str, how: str, runner: StageRunner) -> None:
        self.fn = fn
        self._key, self._how, self._runner = key, how, runner
        self._pending = True

    def __getattr__(self, name: str) -> Any:
        if name == "fn":  # not set yet (a copy being made): no recursion through this method
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, *tensors: torch.Tensor) -> Any:
        if not self._pending:
            return self.fn(*tensors)
        self._pending = False
        before, started = CompilerWork.now(), time.perf_counter()
        out = self.fn(*tensors)
        self._runner._first_call_done(
            self._key, self._how, time.perf_counter() - started, CompilerWork.now().since(before)
        )
        return out


def _fused(module: torch.nn.Module) -> bool:
    return fusion.is_fused(stage_model(module))


class StageRunner:
    """Compiled callables for the stages of one model, by stage key (see :mod:`accel.compile.engines`).

    Args:
        backend: a backend name or instance.
        engines: an engine directory written by ``accel export``; ``None`` compiles every stage in memory.
        strict: a stage that cannot be loaded or compiled raises instead of running eagerly.
        cuda_graphs: replay compiled stages on CUDA as CUDA graphs (:data:`GRAPH_BACKENDS` only).
    """

    def __init__(
        self,
        backend: str | Backend,
        *,
        engines: str | None = None,
        strict: bool = False,
        cuda_graphs: bool = True,
    ) -> None:
        self.backend = get_backend(backend)
        self.store = EngineStore(engines) if engines is not None else None
        self.strict = strict
        self.cuda_graphs = cuda_graphs
        self.counts = RunnerCounts()
        self._callables: dict[Any, StageCallable] = {}
        self._bound: dict[Any, _Bound] = {}

    def get(
        self,
        key: str,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        cache_key: Any = None,
    ) -> StageCallable:
        """The callable for stage ``key``: cached, loaded from the engine directory, or compiled now.

        ``cache_key`` (default ``key``) tells apart in-memory callables of one engine key, e.g. at two
        prompt lengths.
        """
        memo = key if cache_key is None else cache_key
        fn = self._callables.get(memo)
        if fn is not None:
            return fn
        started, before = time.perf_counter(), CompilerWork.now()
        fn = self._load(key, module, example_inputs)
        how = "loaded"
        if fn is None:
            fn = compile_stage(self.backend, module, example_inputs, stage=key, strict=self.strict)
            if fn is module:
                how = "eager"
                self.counts.fallbacks += 1
            else:
                how = "compiled"
                self.counts.compiled += 1
        else:
            self.counts.loaded += 1
        on_cuda = bool(example_inputs) and example_inputs[0].device.type == "cuda"
        if self.cuda_graphs and on_cuda and how != "eager" and self.backend.name in GRAPH_BACKENDS:
            fn = CUDAGraphCallable(fn, key)
        if how != "eager":
            fn = _FirstCallMeter(fn, key, how, self)
            # Engines holding their own weights cannot follow in-place edits either, nor can fused
            # projections (copies of the originals): watch those too.
            watch = BoundWeights(module, edits=not self.backend.binds_weights or _fused(module))
            self._bound[memo] = _Bound(key, module, fn, watch)
        self._callables[memo] = fn
        self.counts.seconds += time.perf_counter() - started
        self.counts.work += CompilerWork.now().since(before)
        log.info("stage %s: %s (backend %s)", key, how, self.backend.name)
        return fn

    def _first_call_done(self, key: str, how: str, seconds: float, work: CompilerWork) -> None:
        self.counts.first_call_seconds += seconds
        self.counts.work += work
        log.info("stage %s: first call %.1f s (%s)", key, seconds, work.describe())
        if how == "loaded" and (work.graphs_generated or work.kernel_benchmarks):
            log.warning(
                "stage %s was loaded from %s, yet its first call took %.1f s and the compiler did work the "
                "engine should have held (%s). Check that the engine was built by this torch and with the "
                "tuning asked for (`accel inspect`); an aot engine holds its kernels and their tuned launch "
                "parameters in the package (`accel export --backend aot`).",
                key,
                self.store.directory if self.store is not None else "the engine directory",
                seconds,
                work.describe(),
            )

    def check_weights(self) -> None:
        """Bind every stage whose weights were replaced since it was bound to the new tensors, or refuse.

        Costs one pass over the stages' parameter tables (no device work). Raises
        :class:`StaleWeightsError` when a replacement changes the graph, or when the backend's engines
        hold their own copy of the weights (then in-place edits count too). A model with fused q/k/v
        projections has them copied again from the originals first (edits count there too).
        """
        refreshed: set[int] = set()
        for bound in self._bound.values():
            replaced = bound.weights.changed()
            if not replaced:
                continue
            named = ", ".join(replaced[:3]) + (f" and {len(replaced) - 3} more" if len(replaced) > 3 else "")
            changes = bound.weights.graph_changes(bound.module)
            if changes:
                raise StaleWeightsError(
                    f"stage {bound.key}: its weights were replaced after it was compiled or loaded, and the "
                    f"new ones change its graph ({'; '.join(changes[:3])}). Wrap the pipeline again "
                    "(accel.unwrap, then accel.wrap), with engines exported for this model."
                )
            if not self.backend.binds_weights:
                raise StaleWeightsError(
                    f"stage {bound.key}: weights changed after it was loaded ({named}), and a "
                    f"{self.backend.name} engine holds its own copy of the weights. Wrap the pipeline again "
                    "after changing weights, or use a backend that binds them at load (aot, inductor)."
                )
            model = stage_model(bound.module)
            if id(model) not in refreshed and fusion.is_fused(model):
                fusion.refresh(model)  # once per model: its stages share the fused copies
                refreshed.add(id(model))
            rebind = getattr(bound.fn, "rebind", None)
            if rebind is not None:
                rebind(bound.module)
            bound.weights = BoundWeights(bound.module, edits=bound.weights.edits)
            self.counts.rebound += 1
            log.warning(
                "stage %s: weights replaced (%s); bound the stage to the new tensors", bound.key, named
            )

    def _load(
        self, key: str, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor]
    ) -> StageCallable | None:
        if self.store is None:
            return None
        try:
            return self.store.load(key, self.backend, module, example_inputs)
        except (EngineError, BackendError, OSError, RuntimeError) as exc:
            if self.strict:
                raise EngineError(f"stage {key}: {exc} (strict=True: not compiling it in memory).") from exc
            message = f"stage {key}: the engine directory cannot serve it ({exc}); compiling it in memory"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            log.warning("%s", message)
            return None
