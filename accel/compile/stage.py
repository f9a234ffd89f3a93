"""Stage callables: a denoiser, or a range of its adapter units, as a module with flat tensor inputs.

Compilers and exporters (``torch.export``, AOTInductor, ONNX, TensorRT) want a module whose inputs and
outputs are flat tensors. :class:`StageModule` is that module for one stage:

* ``whole=True`` (the CFG phase): the full denoiser. Inputs are the tensor arguments of
  ``model.forward`` (``"forward.sample"``, ``"forward.added_cond_kwargs.text_embeds"``, ...); the
  output is the prediction ``"sample"``. Non-tensor arguments are fixed when the stage is built.
* ``whole=False`` (the window phase): units ``[start, end)``. Inputs are the context tensors made by
  ``adapter.prepare`` (``"context.emb"``, ``"context.temb"``, ...) followed by the boundary tensors the
  range reads (``"carry.sample"``, ``"skips.3"``, named as in :meth:`DenoiserAdapter.state_tensors`);
  outputs are every tensor of the state after unit ``end - 1``. Non-tensor context entries (LoRA scale,
  upsample sizes, ``None`` residuals, ...) are fixed when the stage is built and checked when a state is
  flattened, so a call that needs another graph is refused instead of silently miscomputed.

Running a stage module computes exactly what eager ``adapter.run`` computes (same modules, same order).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from accel.errors import AccelError
from accel.models.base import CARRY_PREFIX, SKIP_PREFIX, DenoiserAdapter, SegmentState, dtype_name
from accel.tree import map_tree

CONTEXT_PREFIX = "context."
FORWARD_PREFIX = "forward."


class StageError(AccelError, ValueError):
    """A state or set of arguments does not fit the stage it is given to; the message says what differs."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one stage input."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name=name, shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype))


# -- flattening nested arguments (dicts, lists, tuples) into named tensors and constants -------------------
def _flatten(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor inside ``value`` by a placeholder naming it; collect the tensors by name."""

    def slot(path: str, leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        tensors[path] = leaf
        return _Slot(path)

    return map_tree(value, slot, prefix)


def _fill(template: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """``template`` with every placeholder replaced by its tensor from ``tensors``."""
    return map_tree(template, lambda _path, leaf: tensors[leaf.name] if isinstance(leaf, _Slot) else leaf)


@dataclass(frozen=True)
class _Slot:
    name: str


def _describe(template: Any) -> Any:
    """A JSON-able view of a template (constants as repr, tensors as their names): for fingerprints."""
    if isinstance(template, _Slot):
        return f"<tensor {template.name}>"
    if isinstance(template, dict):
        return {str(k): _describe(v) for k, v in template.items()}
    if isinstance(template, list | tuple):
        return [_describe(v) for v in template]
    return repr(template)


class StageModule(torch.nn.Module):
    """One stage as ``forward(*tensors) -> tuple[tensor, ...]`` (see the module docstring).

    Build it with :func:`build_stage`, which also returns example inputs taken from a real forward.
    The adapter's model is a submodule, so its parameters are the stage's parameters (export lifts them).
    """

    def __init__(
        self,
        adapter: DenoiserAdapter,
        start: int,
        end: int,
        *,
        whole: bool,
        template: Any,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[str],
    ) -> None:
        super().__init__()
        adapter._check_range(start, end)
        self.model = adapter.model
        self._adapter = adapter
        self.start, self.end, self.whole = start, end, whole
        self._template = template
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._n_context = sum(1 for s in self.inputs if not s.name.startswith((CARRY_PREFIX, SKIP_PREFIX)))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.input_names, tensors, strict=True))
        if self.whole:
            kwargs = _fill(self._template, named)
            # The adapter's forward, not model.forward: hooks installed on the denoiser (the CFG split)
            # must not run again inside the stage.
            out = self._adapter.forward(**kwargs)
            return (out[0],)
        context = _fill(self._template, named)
        boundary = {n: t for n, t in named.items() if n.startswith((CARRY_PREFIX, SKIP_PREFIX))}
        state = self._adapter.with_tensors(context, boundary, self.start)
        self._adapter.run(state, self.start, self.end)
        after = self._adapter.state_tensors(state, self.end)
        return tuple(after[name] for name in self.outputs)

    # -- runtime glue -------------------------------------------------------------------------------
    def flat_inputs(self, state: SegmentState) -> tuple[torch.Tensor, ...]:
        """The inputs for a window stage from the state before unit ``start`` (cheap: no device sync)."""
        if self.whole:
            raise StageError("a whole-denoiser stage takes the forward arguments: use forward_inputs().")
        tensors: dict[str, torch.Tensor] = {}
        template = _flatten(_unit_context(state.context), CONTEXT_PREFIX.rstrip("."), tensors)
        if template != self._template:
            raise StageError(
                "the call's non-tensor context (LoRA scale, masks or residuals present, upsample sizes...) "
                f"differs from the one stage [{self.start}, {self.end}) was built for; rebuild the stage."
            )
        tensors.update(self._adapter.state_tensors(state, self.start))
        return self._ordered(tensors)

    def forward_inputs(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """The inputs for a whole-denoiser stage from ``model.forward``'s arguments."""
        if not self.whole:
            raise StageError("a unit-range stage takes a state: use flat_inputs(state).")
        tensors: dict[str, torch.Tensor] = {}
        template = _flatten(_bind(self.model, args, kwargs), FORWARD_PREFIX.rstrip("."), tensors)
        if template != self._template:
            raise StageError(
                "the call's non-tensor arguments differ from the ones the whole-denoiser stage was built "
                "for; rebuild the stage."
            )
        return self._ordered(tensors)

    def _ordered(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        missing = [n for n in self.input_names if n not in tensors]
        if missing:
            raise StageError(
                f"stage [{self.start}, {self.end}) needs {', '.join(missing)}, which the call lacks."
            )
        # Contiguous, as the stage was built and exported: compiled engines assume the example's strides,
        # and pipelines pass views such as SD3's `t.expand(batch)` timestep (stride 0).
        flat = tuple(tensors[n].contiguous() for n in self.input_names)
        for spec, tensor in zip(self.inputs, flat, strict=True):
            if tuple(tensor.shape) != spec.shape:
                raise StageError(
                    f"{spec.name} has shape {tuple(tensor.shape)}, the stage was built for {spec.shape}; "
                    "build (or export) the stage for this shape bucket."
                )
        return flat

    def run_state(self, fn: Any, state: SegmentState) -> SegmentState:
        """Run a compiled window stage ``fn`` on ``state`` (before ``start``); the state after ``end - 1``.

        Skips below the ones the range pops stay in the returned state, as ``adapter.run`` leaves them.
        """
        outputs = fn(*self.flat_inputs(state))
        consumed = sum(1 for s in self.inputs if s.name.startswith(SKIP_PREFIX))
        kept = state.skips[: len(state.skips) - consumed]
        base = self._adapter.skip_depth(self.start) - len(state.skips)
        named = {f"{SKIP_PREFIX}{base + i}": t for i, t in enumerate(kept)}
        named.update(zip(self.outputs, outputs, strict=True))
        return self._adapter.with_tensors(state.context, named, self.end)

    def graph_signature(self) -> str:
        """Structure of the stage (module tree, parameter shapes/dtypes, inputs, fixed arguments), no values.

        Equal for two models that differ only in weight values; see :func:`stage_fingerprint`.
        """
        params = [(n, list(p.shape), dtype_name(p.dtype)) for n, p in self.model.named_parameters()]
        buffers = [(n, list(b.shape), dtype_name(b.dtype)) for n, b in self.model.named_buffers()]
        blob = {
            "model": type(self.model).__name__,
            "modules": [f"{n}:{type(m).__name__}" for n, m in self.model.named_modules()],
            "parameters": params,
            "buffers": buffers,
            "units": [u.name for u in self._adapter.units[self.start : self.end]],
            "range": [self.start, self.end],
            "whole": self.whole,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": list(self.outputs),
            "fixed": _describe(self._template),
        }
        return json.dumps(blob, sort_keys=True)


def stage_model(module: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model a stage runs: a :class:`StageModule`'s ``model``, else ``module`` itself (a
    decoder stage, or a whole denoiser given as a stage)."""
    return getattr(module, "model", module)


def stage_fingerprint(stage: StageModule) -> str:
    """sha256 (16 hex digits) of :meth:`StageModule.graph_signature`: independent of weight values."""
    return hashlib.sha256(stage.graph_signature().encode()).hexdigest()[:16]


def _bind(model: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    import inspect

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    # Defaults made explicit: a pipeline that passes `timestep_cond=None` and an example that leaves it
    # out describe the same graph.
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments["return_dict"] = False
    return arguments


def _unit_context(context: Mapping[str, Any]) -> dict[str, Any]:
    """A call's context as a unit-range stage sees it: ``return_dict`` only shapes the model's final
    output, which such a stage never builds, so `accel export` (diffusers' default, True) and a pipeline
    (False) describe the same stage."""
    return {**context, "return_dict": False} if "return_dict" in context else dict(context)


def _needed_skips(adapter: DenoiserAdapter, start: int, end: int) -> list[int]:
    pushed: set[int] = set()
    needed: set[int] = set()
    for index in range(start, end):
        push, pop = adapter.skip_indices(index)
        needed.update(k for k in pop if k not in pushed)
        pushed.update(push)
    return sorted(needed)


def build_stage(
    adapter: DenoiserAdapter,
    start: int,
    end: int,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    whole: bool = False,
) -> tuple[StageModule, tuple[torch.Tensor, ...]]:
    """The stage module for units ``[start, end)`` (or the whole denoiser) and example flat inputs.

    ``args``/``kwargs`` are one call of ``model.forward`` at the stage's shape (e.g.
    ``adapter.example_inputs(...)``); the example boundary inputs come from running units ``[0, start)``
    eagerly on them.
    """
    kwargs = dict(kwargs or {})
    if whole:
        tensors: dict[str, torch.Tensor] = {}
        template = _flatten(_bind(adapter.model, args, kwargs), FORWARD_PREFIX.rstrip("."), tensors)
        tensors = {n: t.contiguous() for n, t in tensors.items()}
        specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
        stage = StageModule(
            adapter, 0, len(adapter.units), whole=True, template=template, inputs=specs, outputs=("sample",)
        )
        return stage, tuple(tensors.values())
    adapter._check_range(start, end)
    if start == end:
        raise StageError(f"stage [{start}, {end}) has no units.")
    with torch.no_grad():
        state = adapter.prepare(*args, **kwargs)
        adapter.run(state, 0, start)
        named_context: dict[str, torch.Tensor] = {}
        template = _flatten(_unit_context(state.context), CONTEXT_PREFIX.rstrip("."), named_context)
        before = adapter.state_tensors(state, start)
        needed = {f"{SKIP_PREFIX}{k}" for k in _needed_skips(adapter, start, end)}
        boundary = {n: t for n, t in before.items() if n.startswith(CARRY_PREFIX) or n in needed}
        # Drop the skips the range does not read: the stage sees only the top of the stack it pops.
        state = adapter.with_tensors(state.context, boundary, start)
        adapter.run(state, start, end)
        outputs = tuple(adapter.state_tensors(state, end))
    tensors = {n: t.contiguous() for n, t in {**named_context, **boundary}.items()}
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
    stage = StageModule(adapter, start, end, whole=False, template=template, inputs=specs, outputs=outputs)
    return stage, tuple(tensors.values())


class DecoderStage(torch.nn.Module):
    """A VAE decoder as ``forward(z) -> (image,)`` (flat tensors, as compilers and exporters want)."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.decoder(z),)


def decoder_dtype(vae: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype diffusers pipelines decode in: fp32 for an fp16 VAE marked ``force_upcast`` (SDXL)."""
    force_upcast = bool(getattr(getattr(vae, "config", None), "force_upcast", False))
    return torch.float32 if dtype == torch.float16 and force_upcast else dtype
