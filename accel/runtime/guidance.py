"""Condition-based partitioning: the denoiser hook that splits the CFG batch across ranks.

diffusers pipelines that use classifier-free guidance call the denoiser once per step on a batch of
``2B`` rows (``B`` unconditional, then ``B`` conditional). The hook gives each rank a contiguous part
of that batch, runs the denoiser on it, and all-gathers the prediction, so that the pipeline sees the
same ``2B`` prediction on every rank and applies guidance and the scheduler step itself. Every batched
input is sliced the same way (latents, batched timesteps, text states, pooled and added conditioning,
ControlNet residuals, anything in nested dicts/lists whose first dimension is the batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.utils import BaseOutput

from accel.runtime.comm import Communicator

HOOK_NAME = "accel.cfg_split"


@dataclass(frozen=True)
class BatchSplit:
    """How a batch of ``batch`` rows is spread over ``world_size`` ranks.

    The batch is cut into ``parts`` equal contiguous parts, the largest divisor of ``world_size`` that
    divides ``batch``; each part runs on ``world_size // parts`` ranks (replicas). ``parts == 1`` means
    no split: every rank runs the whole batch and nothing is exchanged.
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
    if isinstance(tree, torch.Tensor):
        return tree[rows] if tree.dim() > 0 and tree.shape[0] == batch else tree
    if isinstance(tree, BaseOutput):
        return tree
    if isinstance(tree, dict):
        return type(tree)((k, slice_batch(v, batch, rows)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        items = [slice_batch(v, batch, rows) for v in tree]
        return type(tree)(items) if not hasattr(tree, "_fields") else type(tree)(*items)
    return tree


def _map_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, BaseOutput):
        return type(output)(**{k: _map_output(v, fn) for k, v in output.items()})
    if isinstance(output, (list, tuple)):
        return type(output)(_map_output(v, fn) for v in output)
    return output


def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The batch size of the denoiser call: the leading dim of its first tensor input (the latents)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


class CFGSplitHook(ModelHook):
    """Runs this rank's part of the denoiser batch and all-gathers the full prediction.

    Args:
        comm: the communicator of the ranks that share the batch.
        owns_result: a callable telling whether the pipeline will only read the returned prediction
            within the current step (true while it combines CFG branches). Then the gather buffer is
            returned as is; otherwise a copy, because schedulers such as PNDM keep past predictions.
    """

    _is_stateful = True

    def __init__(self, comm: Communicator, owns_result: Callable[[], bool]) -> None:
        super().__init__()
        self.comm = comm
        self.owns_result = owns_result
        self.calls = 0
        self.split_calls = 0
        self._splits: dict[int, BatchSplit] = {}

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.calls = 0
        self.split_calls = 0
        return module

    def split_for(self, batch: int) -> BatchSplit:
        split = self._splits.get(batch)
        if split is None:
            split = self._splits[batch] = BatchSplit.plan(batch, self.comm.world_size)
        return split

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        assert forward is not None, "the hook registry sets original_forward for hooks with new_forward"
        self.calls += 1
        batch = _batch_of(args, kwargs)
        if batch is None:
            return forward(*args, **kwargs)
        split = self.split_for(batch)
        if split.parts == 1:
            return forward(*args, **kwargs)
        rows = split.rows_of(self.comm.rank)
        output = forward(*slice_batch(args, batch, rows), **slice_batch(kwargs, batch, rows))
        self.split_calls += 1
        return _map_output(output, lambda local: self._gather(local, split))

    def _gather(self, local: torch.Tensor, split: BatchSplit) -> torch.Tensor:
        if local.dim() == 0 or local.shape[0] != split.rows:
            return local
        full = self.comm.all_gather(local)
        if split.replicas > 1:
            # Each part was computed by `replicas` ranks; keep the first copy of each.
            full = full.view(split.parts, split.replicas, *local.shape)[:, 0].reshape(
                split.batch, *local.shape[1:]
            )
            return full
        return full if self.owns_result() else full.clone()
