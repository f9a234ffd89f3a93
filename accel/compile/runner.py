"""Compiled stage callables at run time: made on first use per shape, or loaded from an engine directory.

:class:`StageRunner` is what the runtime asks for "the callable of stage ``key`` built from this module and
these inputs". It loads the engine from the directory given as ``engines=`` when one fits (the store
validates weights, shapes, versions and checksums first), and otherwise compiles in memory with the
per-stage fallback of :func:`accel.compile.backends.compile_stage`. On CUDA, every compiled callable
(not ``eager``, not ``onnx``) is replayed as a CUDA graph (:class:`CUDAGraphCallable`): at batch 1 the
denoiser is bound by kernel-launch overhead, which graph replay removes.

Counters (``compiled``, ``loaded``, ``fallbacks``) say what happened, so that tests and reports can check
that a run from an engine directory compiled nothing.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from accel.compile.backends import Backend, BackendError, StageCallable, compile_stage, get_backend
from accel.compile.store import EngineError, EngineStore

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


@dataclass
class RunnerCounts:
    """What a :class:`StageRunner` did: stages compiled in memory, loaded from engines, run eagerly, and
    the seconds spent compiling or loading them."""

    compiled: int = 0
    loaded: int = 0
    fallbacks: int = 0
    seconds: float = 0.0


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
        self._callables: dict[str, StageCallable] = {}

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
        started = time.perf_counter()
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
        self._callables[memo] = fn
        self.counts.seconds += time.perf_counter() - started
        log.info("stage %s: %s (backend %s)", key, how, self.backend.name)
        return fn

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
