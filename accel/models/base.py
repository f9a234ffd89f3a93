"""The adapter interface: a denoiser as an ordered list of units with a segmented forward.

Running ``prepare``, then every unit in order, then ``finish`` computes exactly what ``model.forward``
computes (same operations in the same order), so any split of the unit range into stages, run one after
another and handing a :class:`SegmentState` along, reproduces the model's output bit for bit.

Naming of the tensors that flow between units (used by :meth:`DenoiserAdapter.trace`, by plan files and
by the pipeline runtime): ``"carry.<key>"`` is ``state.carry[key]``; ``"skips.<k>"`` is the ``k``-th
tensor ever pushed onto the U-Net skip stack (``k`` counts from 0 in push order, so it names the same
tensor whichever stage holds it).
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.errors import AccelError

logger = logging.getLogger(__name__)

CARRY_PREFIX = "carry."
SKIP_PREFIX = "skips."


class UnsupportedModelError(AccelError, TypeError):
    """The denoiser's structure is not one an adapter knows; the message names what is missing."""


@dataclass(frozen=True)
class Unit:
    """One unit of work: a name and the module paths (relative to the denoiser) whose weights it uses."""

    name: str
    module_paths: tuple[str, ...]


@dataclass
class SegmentState:
    """Everything a run of units needs, handed from one unit (or stage) to the next.

    Attributes:
        context: per-call inputs derived once in ``prepare`` and only read by units (time embedding,
            processed text states, masks, attention kwargs, ControlNet residuals...). Every stage computes
            it itself from the forward arguments; it never crosses a stage boundary.
        carry: activations flowing from unit to unit (U-Net: ``"sample"``, and inside a split attention
            ``"tokens"`` + ``"residual"``; DiT: ``"hidden_states"``, ``"encoder_hidden_states"``, and
            ``"sample"`` after the last unit).
        skips: the U-Net skip stack, top at the end (always empty for DiTs). It may hold just the top
            part of the full stack: units only ever pop from the end.
    """

    context: dict[str, Any]
    carry: dict[str, torch.Tensor]
    skips: list[torch.Tensor] = field(default_factory=list)

    def copy(self) -> SegmentState:
        """A shallow copy: new ``carry`` dict and ``skips`` list, same tensors, same ``context``."""
        return SegmentState(context=self.context, carry=dict(self.carry), skips=list(self.skips))


@dataclass(frozen=True)
class TensorEdge:
    """A tensor produced by unit ``producer`` and read by unit ``consumer`` (``producer < consumer``)."""

    name: str
    producer: int
    consumer: int
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def parameter_placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype] | None:
    """Where the model's floating-point weights live and their dominant dtype (by element count).

    Counting elements, not taking the first parameter, keeps a fp16 model with a few modules kept in fp32
    (diffusers' ``_keep_in_fp32_modules``) reported as fp16.
    """
    counts: dict[torch.dtype, int] = {}
    device = None
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
            device = device or p.device
    if device is None:
        return None
    return device, max(counts, key=lambda d: counts[d])


def _edge(name: str, producer: int, consumer: int, tensor: torch.Tensor) -> TensorEdge:
    return TensorEdge(
        name=name,
        producer=producer,
        consumer=consumer,
        shape=tuple(tensor.shape),
        dtype=dtype_name(tensor.dtype),
        nbytes=tensor.numel() * tensor.element_size(),
    )


class _ReadRecorder(dict):  # type: ignore[type-arg]
    """A carry dict that remembers which keys were read (used by ``trace`` only)."""

    def __init__(self, data: Mapping[str, torch.Tensor]) -> None:
        super().__init__(data)
        self.reads: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        value = super().__getitem__(key)
        self.reads.setdefault(key, value)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        return default

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self.reads.setdefault(key, super().__getitem__(key))
        return super().pop(key, *default)


class DenoiserAdapter(ABC):
    """A denoiser seen as ``prepare -> units[0] -> ... -> units[N-1] -> finish``.

    Subclasses set ``family``, ``model``, ``units``, and the per-unit skip bookkeeping
    ``_pushes``/``_pops`` (how many skip tensors each unit pushes and pops), then implement
    ``prepare``, ``_step``, ``finish`` and ``example_inputs``.
    """

    family: str
    model: torch.nn.Module
    units: list[Unit]
    #: module paths used by ``prepare`` (every stage needs them, e.g. the time embedding)
    context_module_paths: tuple[str, ...] = ()
    _pushes: list[int]
    _pops: list[int]

    # -- to implement ---------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, *args: Any, **kwargs: Any) -> SegmentState:
        """Derive the context and the initial carry from exactly ``model.forward``'s arguments."""

    @abstractmethod
    def _step(self, index: int, state: SegmentState) -> None:
        """Run unit ``index`` on ``state`` in place."""

    @abstractmethod
    def _output_class(self) -> type:
        """The diffusers output dataclass ``model.forward`` returns with ``return_dict=True``."""

    def finish(self, state: SegmentState) -> Any:
        """Turn the state after the last unit into exactly what ``model.forward`` returns:
        ``(sample,)`` or the model's output dataclass, as ``return_dict`` asked."""
        sample = state.carry["sample"]
        if not state.context.get("return_dict", True):
            return (sample,)
        return self._output_class()(sample=sample)

    @abstractmethod
    def example_inputs(
        self,
        *,
        batch: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device | str,
        text_len: int | None = None,
        vae_scale_factor: int = 8,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Dummy ``(args, kwargs)`` for ``model.forward`` at a pixel resolution (for profiling)."""

    # -- provided -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.units)

    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= len(self.units):
            raise IndexError(
                f"unit range [{start}, {end}) is outside [0, {len(self.units)}) for {type(self.model).__name__}."
            )

    @contextlib.contextmanager
    def _lora_scaled(self, state: SegmentState) -> Iterator[None]:
        # diffusers scales PEFT LoRA layers for the duration of forward(); do the same per run.
        scale = state.context.get("lora_scale", 1.0)
        if scale == 1.0:
            yield
            return
        from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

        if not USE_PEFT_BACKEND:
            yield
            return
        scale_lora_layers(self.model, scale)
        try:
            yield
        finally:
            unscale_lora_layers(self.model, scale)

    def run_unit(self, index: int, state: SegmentState) -> SegmentState:
        """Run one unit; ``state`` is updated in place and returned."""
        self._check_range(index, index + 1)
        with self._lora_scaled(state):
            self._step(index, state)
        return state

    def run(self, state: SegmentState, start: int, end: int) -> SegmentState:
        """Run units ``[start, end)`` in order; ``state`` is updated in place and returned."""
        self._check_range(start, end)
        with self._lora_scaled(state):
            for index in range(start, end):
                self._step(index, state)
        return state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``prepare`` + every unit + ``finish``: equal to ``model.forward(*args, **kwargs)``."""
        state = self.prepare(*args, **kwargs)
        return self.finish(self.run(state, 0, len(self.units)))

    def skip_depth(self, index: int) -> int:
        """Size of the full skip stack just before unit ``index`` (``index == len(units)``: at the end)."""
        self._check_range(index, index)
        return sum(self._pushes[:index]) - sum(self._pops[:index])

    def skip_indices(self, index: int) -> tuple[list[int], list[int]]:
        """Absolute skip indices ``(pushed, popped)`` by unit ``index``, in push/pop order."""
        depth = self.skip_depth(index)
        pushed_so_far = sum(self._pushes[:index])
        popped = [depth - 1 - i for i in range(self._pops[index])]
        # A unit pops before it pushes (up blocks never push), so pushes continue the push count.
        pushed = [pushed_so_far + i for i in range(self._pushes[index])]
        return pushed, popped

    def state_tensors(self, state: SegmentState, at: int) -> dict[str, torch.Tensor]:
        """Name every tensor of a state that sits just before unit ``at`` (``"carry.k"``, ``"skips.k"``).

        The skips list is taken as the top of the stack, so its last entry is ``skip_depth(at) - 1``.
        """
        named = {CARRY_PREFIX + key: value for key, value in state.carry.items()}
        top = self.skip_depth(at)
        base = top - len(state.skips)
        named.update({f"{SKIP_PREFIX}{base + i}": value for i, value in enumerate(state.skips)})
        return named

    def with_tensors(
        self, context: dict[str, Any], tensors: Mapping[str, torch.Tensor], at: int
    ) -> SegmentState:
        """Build the state for running from unit ``at`` out of named tensors (see :meth:`state_tensors`).

        Skip tensors must be the top of the stack at ``at`` without gaps (``skips.j .. skips.(d-1)`` with
        ``d = skip_depth(at)``), since units pop from the end.
        """
        carry: dict[str, torch.Tensor] = {}
        skips: dict[int, torch.Tensor] = {}
        for name, value in tensors.items():
            if name.startswith(CARRY_PREFIX):
                carry[name[len(CARRY_PREFIX) :]] = value
            elif name.startswith(SKIP_PREFIX):
                skips[int(name[len(SKIP_PREFIX) :])] = value
            else:
                raise ValueError(f"tensor name {name!r} is neither 'carry.<key>' nor 'skips.<index>'.")
        depth = self.skip_depth(at)
        expected = list(range(depth - len(skips), depth))
        if sorted(skips) != expected:
            raise ValueError(
                f"skips {sorted(skips)} before unit {at} are not the top of the skip stack (depth {depth}); "
                f"give skips {expected[0] if expected else depth}..{depth - 1} without gaps."
            )
        return SegmentState(context=context, carry=carry, skips=[skips[k] for k in expected])

    def trace(self, *args: Any, **kwargs: Any) -> list[TensorEdge]:
        """Run the forward once and record every tensor passing between two units.

        A carry edge goes from the last unit that wrote or read-and-passed-on a carry entry to the next
        unit that reads it (so each entry has one producer at a time and no tensor is counted twice); a
        skip edge from the unit that pushed a skip to the unit that pops it. Inputs made by ``prepare``
        (every stage computes them) and the final output read by ``finish`` are not edges.

        For a stage running units ``[lo, hi)``, the edges with ``lo <= consumer < hi`` and
        ``producer < lo`` are exactly the named tensors it needs (see :meth:`with_tensors`); the edges
        with ``lo <= producer < hi <= consumer`` are the ones it must keep or send on.
        """
        state = self.prepare(*args, **kwargs)
        carry_producer: dict[str, int] = {key: -1 for key in state.carry}
        skip_producer: dict[int, tuple[int, torch.Tensor]] = {}
        edges: list[TensorEdge] = []
        with self._lora_scaled(state):
            for index in range(len(self.units)):
                pushed, popped = self.skip_indices(index)
                for k in popped:
                    producer, tensor = skip_producer.pop(k)
                    edges.append(_edge(f"{SKIP_PREFIX}{k}", producer, index, tensor))
                before = dict(state.carry)
                recorder = _ReadRecorder(state.carry)
                state.carry = recorder
                skips_before = len(state.skips)
                self._step(index, state)
                for key, value in recorder.reads.items():
                    if before.get(key) is value and carry_producer.get(key, -1) >= 0:
                        edges.append(_edge(CARRY_PREFIX + key, carry_producer[key], index, value))
                state.carry = dict(recorder)
                for key, value in state.carry.items():
                    # A unit that reads a carry entry and passes it on counts as its new producer: the
                    # state travels unit to unit, so each reader is the next hop (no duplicate edges).
                    if key in recorder.reads or before.get(key) is not value:
                        carry_producer[key] = index
                for key in set(carry_producer) - set(state.carry):
                    del carry_producer[key]
                new_skips = state.skips[skips_before - len(popped) :]
                if len(new_skips) != len(pushed):
                    raise RuntimeError(
                        f"unit {index} ({self.units[index].name}) pushed {len(new_skips)} skips, "
                        f"the adapter declares {len(pushed)}: this is a bug in {type(self).__name__}."
                    )
                for k, tensor in zip(pushed, new_skips, strict=True):
                    skip_producer[k] = (index, tensor)
        edges.sort(key=lambda e: (e.consumer, e.producer, e.name))
        return edges
