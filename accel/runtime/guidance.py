"""Condition-based partitioning: the denoiser hook that splits the CFG batch across ranks.

diffusers pipelines that use classifier-free guidance call the denoiser once per step on a batch of
``2B`` rows (``B`` unconditional, then ``B`` conditional). The hook gives each rank a contiguous part
of that batch, runs the denoiser on it, and all-gathers the prediction, so that the pipeline sees the
same ``2B`` prediction on every rank and applies guidance and the scheduler step itself. Every batched
input is sliced the same way (latents, batched timesteps, text states, pooled and added conditioning,
ControlNet residuals, anything in nested dicts/lists whose first dimension is the batch).

On ``2k`` ranks (:mod:`accel.runtime.groups`) the ranks that share one part of the batch (a *block*) run
it with the image tokens sharded (DiTs, :mod:`accel.runtime.sequence`) or each run all of it (U-Nets, or a
DiT whose heads or tokens the block cannot share evenly); the prediction is gathered over the ranks that
hold different parts (a *stride*), so nothing is gathered twice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook

from accel.runtime.comm import Communicator
from accel.runtime.sequence import SequenceParallel
from accel.tree import map_tree

log = logging.getLogger(__name__)

HOOK_NAME = "accel.cfg_split"


@dataclass(frozen=True)
class BatchSplit:
    """How a batch of ``batch`` rows is spread over ``world_size`` ranks.

    The batch is cut into ``parts`` equal contiguous parts, the largest divisor of ``world_size`` that
    divides ``batch`` (``gcd(batch, world_size)``); each part runs on a block of ``world_size // parts``
    consecutive ranks (``replicas``). With guidance the batch is ``2B`` and ``parts = 2 * gcd(B, k)`` on
    ``2k`` ranks, so the unconditional rows land on CFG group 0 (ranks ``[0, k)``) and the conditional rows
    on group 1, each branch split ``gcd(B, k)`` ways inside its group. ``parts == 1`` means no batch
    split: every rank runs the whole batch.
    """

    batch: int
    world_size: int
    parts: int

    @classmethod
    def plan(cls, batch: int, world_size: int) -> BatchSplit:
        parts = max(p for p in range(1, world_size + 1) if world_size % p == 0 and batch % p == 0)
        return cls(batch=batch, world_size=world_size, parts=parts)

    @property
    def replicas(self) -> int:
        return self.world_size // self.parts

    @property
    def rows(self) -> int:
        """Rows per part."""
        return self.batch // self.parts

    def part_of(self, rank: int) -> int:
        return rank // self.replicas

    def rows_of(self, rank: int) -> slice:
        start = self.part_of(rank) * self.rows
        return slice(start, start + self.rows)


def slice_batch(tree: Any, batch: int, rows: slice) -> Any:
    """``tree`` with every tensor whose first dimension is ``batch`` cut to ``rows``.

    Tensors of another leading size (a scalar timestep, a shared mask) pass through unchanged.
    """

    def cut(_path: str, leaf: Any) -> Any:
        batched = isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch
        return leaf[rows] if batched else leaf

    return map_tree(tree, cut)


def _map_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A denoiser output (tensor, tuple or diffusers output) with every tensor replaced by ``fn(tensor)``."""
    return map_tree(output, lambda _path, leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf)


def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The batch size of the denoiser call: the leading dim of its first tensor input (the latents)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def _no_problem() -> str | None:
    return None


@dataclass
class SplitState:
    """Per-call state of :class:`CFGSplitHook` (``reset`` at every pipeline call): what it counted."""

    calls: int = 0
    split_calls: int = 0

    def reset(self) -> None:
        """Back to a fresh state (every field to its default); subclasses add their fields."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default_factory() if f.default_factory is not MISSING else f.default)


class CFGSplitHook(ModelHook):
    """Runs this rank's part of the denoiser batch and all-gathers the full prediction.

    Args:
        comm: the communicator of the ranks that share the batch (its sub-groups created, for ``2k > 2``).
        owns_result: a callable telling whether the pipeline will only read the returned prediction
            within the current step (true while it combines CFG branches). Then the gather buffer is
            returned as is; otherwise a copy, because schedulers such as PNDM keep past predictions.
        sequence_parallel: let a block of ranks that shares one part of the batch run a DiT with its image
            tokens sharded (exact). ``None``: on when the CFG groups have more than one rank (``2k > 2``);
            with 2 ranks no block ever shares a CFG branch.
        split_problem: a callable telling why the pipeline's current batch must not be cut into rows at
            all (``None``: it may). Perturbed-attention guidance is one: its attention processors tell its
            three branches apart by chunking the batch inside the denoiser. Such calls run whole on every
            rank (exact, no speed-up), with one warning naming the reason.
    """

    _is_stateful = True
    #: the per-call state class (subclasses with more per-call state extend it)
    State: type[SplitState] = SplitState
    state: SplitState

    def __init__(
        self,
        comm: Communicator,
        owns_result: Callable[[], bool],
        *,
        sequence_parallel: bool | None = None,
        split_problem: Callable[[], str | None] | None = None,
    ) -> None:
        super().__init__()
        self.comm = comm
        self.owns_result = owns_result
        self.split_problem = split_problem or _no_problem
        self.state = self.State()
        self._splits: dict[int, BatchSplit] = {}
        self._sequence_wanted = comm.layout.group_size > 1 if sequence_parallel is None else sequence_parallel
        #: the sharded-forward runner while installed on a DiT (``None``: blocks run their part whole)
        self.sequence: SequenceParallel | None = None
        self._sequence_problem: str | None = None
        self._noted: set[tuple[int, str]] = set()

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        if self._sequence_wanted:
            self.sequence, self._sequence_problem = SequenceParallel.install(module)
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.sequence is not None:
            self.sequence.remove()
            self.sequence = None
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
        return module

    @property
    def calls(self) -> int:
        """Denoiser calls of the current pipeline call."""
        return self.state.calls

    @property
    def split_calls(self) -> int:
        """Denoiser calls of the current pipeline call that were split across ranks."""
        return self.state.split_calls

    def split_for(self, batch: int) -> BatchSplit:
        split = self._splits.get(batch)
        if split is None:
            split = self._splits[batch] = BatchSplit.plan(batch, self.comm.world_size)
        return split

    def block_for(
        self, split: BatchSplit, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Communicator | None:
        """The communicator of the block that runs this rank's part sharded, or ``None`` when each rank of
        the block runs the part whole (no block, a U-Net, or a DiT the block cannot share evenly).

        ``args``/``kwargs`` are this part's inputs. Every rank decides alike from the same inputs.
        """
        size = split.replicas
        if size == 1 or not self._sequence_wanted:
            return None
        problem = (
            self._sequence_problem if self.sequence is None else self.sequence.problem(size, args, kwargs)
        )
        if problem is None:
            return self.comm.block(size)
        if (size, problem) not in self._noted:
            self._noted.add((size, problem))
            # Expected for U-Nets (INFO); for a DiT it costs the speed-up, so say so louder.
            level = logging.INFO if self.sequence is None else logging.WARNING
            log.log(
                level,
                "rank %d: the %d ranks sharing %d of %d batch rows each run them whole: %s.",
                self.comm.rank,
                size,
                split.rows,
                split.batch,
                problem,
            )
        return None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self._split_forward(args, kwargs)

    def _note_once(self, message: str) -> None:
        """Warn about ``message`` once per hook (rank 0 only: every rank decides alike)."""
        if (0, message) not in self._noted:
            self._noted.add((0, message))
            if self.comm.rank == 0:
                log.warning("%s", message)

    def _original_forward(self) -> Callable[..., Any]:
        forward = self.fn_ref.original_forward
        assert forward is not None, "the hook registry sets original_forward for hooks with new_forward"
        return forward

    def _split_forward(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_gathered: Callable[[torch.Tensor, torch.Tensor, BatchSplit], None] | None = None,
    ) -> Any:
        """This rank's part of the call, its output gathered; ``on_gathered(local, full, split)`` sees every
        tensor gathered, in output order (the first one is the prediction)."""
        forward = self._original_forward()
        self.state.calls += 1
        batch = _batch_of(args, kwargs)
        if batch is None:
            return forward(*args, **kwargs)
        problem = self.split_problem()
        if problem is not None:
            self._note_once(f"denoiser calls run whole on every rank (exact, no speed-up): {problem}")
            return forward(*args, **kwargs)
        split = self.split_for(batch)
        rows = split.rows_of(self.comm.rank)
        if split.parts > 1:
            args, kwargs = slice_batch(args, batch, rows), slice_batch(kwargs, batch, rows)
        block = self.block_for(split, args, kwargs)
        if block is None and split.parts == 1:
            return forward(*args, **kwargs)
        self.state.split_calls += 1
        if block is not None:
            assert self.sequence is not None  # block_for returns a block only with a runner
            output = self.sequence.forward(block, args, kwargs)
        else:
            output = forward(*args, **kwargs)
        if split.parts == 1:
            return output  # the block's output is whole on every rank and freshly allocated
        return self._gather_output(output, split, on_gathered)

    def _gather_output(
        self,
        output: Any,
        split: BatchSplit,
        on_gathered: Callable[[torch.Tensor, torch.Tensor, BatchSplit], None] | None = None,
    ) -> Any:
        """``output`` with every tensor of this rank's rows replaced by all ranks' rows (see ``_split_forward``)."""

        def gather(local: torch.Tensor) -> torch.Tensor:
            full = self._gather(local, split)
            if on_gathered is not None and full is not local:
                on_gathered(local, full, split)
            return full

        return _map_output(output, gather)

    def _gather(self, local: torch.Tensor, split: BatchSplit) -> torch.Tensor:
        if local.dim() == 0 or local.shape[0] != split.rows:
            return local
        # One rank per block holds each part once: gather over that stride, in part (= row) order.
        full = self.comm.stride(split.replicas).all_gather(local)
        return full if self.owns_result() else full.clone()
