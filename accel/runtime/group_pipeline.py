"""The hybrid window on ``2k`` ranks: each CFG group pipelines its own branch over ``k`` stages.

Outside the window the hook is the CFG split on the group layout (:class:`CFGSplitHook`: batch split,
sequence parallelism or whole branches; exact). The relative gap between the branches is measured from the
gathered prediction on every rank alike and decides the window (:mod:`accel.runtime.schedule`).

In the window CFG group ``g`` (ranks ``[g k, (g + 1) k)``) runs branch ``g`` with its ``k`` ranks as the
``k`` stages of the plan (stage ``j`` on the group's ``j``-th rank), each on the boundary tensors the other
stages produced at the previous step. Both branches are computed every step, so the pipeline's own guidance
formula runs on a real unconditional and a real conditional prediction: the window is approximate only
through the stale activations, never through guidance (no ``window_guidance`` choice is needed, and
``accel.wrap`` ignores that setting when it selects this hook for ``strategy="hybrid"`` on ``2k > 2`` ranks).

The first window step runs each branch whole on every rank of its group: in CFG steps the group's ranks
hold only their share of the activations (rows, or tokens), so this step computes the exact prediction and
captures each rank's stage inputs at once, and it needs no look-ahead of the adaptive rule (the published
code also starts its window with a full forward). The following window steps are pipelined: each rank runs
its stage, posts the boundary tensors it produced to the stages that read them (``batch_isend_irecv`` into
double-buffered receive slots, waited for at the next step), and the two branch predictions, produced by
the rank of each group that owns the last unit, reach every rank through one all-gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from accel.models import DenoiserAdapter, TensorEdge
from accel.runtime.comm import Communicator
from accel.runtime.guidance import BatchSplit, _batch_of, _map_output
from accel.runtime.schedule import relative_gap
from accel.runtime.stages import PREDICTION, Segment, StageExecutor, first_tensor
from accel.runtime.window import WindowHook


class GroupPipelineHook(WindowHook[StageExecutor]):
    """CFG split on the group layout plus a per-group ``k``-stage pipelined window (module docstring).

    Takes the arguments of :class:`WindowHook`, with ``comm`` the world communicator with its sub-groups
    (``2k`` ranks, ``k >= 2``) and ``get_plan`` returning plans of ``k`` stages (one per rank of a group);
    with a ``runner`` every window segment runs through it, under the engine keys ``accel export`` writes
    for the ``k``-stage plan.

    ``recorder``: set to a callable to receive a :class:`StepRecord` per guided denoiser call (tests).
    """

    def _check_world(self, comm: Communicator) -> None:
        if comm.layout.group_size < 2:
            raise ValueError(
                f"the group pipeline needs CFG groups of 2 or more ranks (4+ devices), this world has "
                f"{comm.world_size}; on 2 devices use the 2-stage hybrid runtime (HybridHook)."
            )

    @property
    def k(self) -> int:
        """Ranks per CFG group: the stages each branch is pipelined over."""
        return self.comm.layout.group_size

    @property
    def position(self) -> int:
        """This rank's place in its CFG group: the plan stage it runs in the window."""
        return self.comm.rank - self.branch * self.k

    def _reset_call(self) -> None:
        super()._reset_call()
        self._measure = False

    # -- the hook ----------------------------------------------------------------------------------
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        step = self.calls
        batch = _batch_of(args, kwargs)
        if batch is None or not self._windowed(batch):
            return super().new_forward(module, *args, **kwargs)  # not a 2-branch CFG call
        phase = self._enter(step, module, args, kwargs, batch)
        if phase == "cfg":
            self._measure = True
            output = super().new_forward(module, *args, **kwargs)
            if self._measure:  # nothing was gathered
                self._measure = False
                self._rates.skip()
            self._record(step, "cfg", self._all_units(), [])
            return output
        self.calls += 1
        self.split_calls += 1
        window = self._window
        assert window is not None and self._executor is not None
        branch_args, branch_kwargs = self._branch_inputs(args, kwargs, batch, self.branch)
        if step == window[0]:
            return self._prime(step, branch_args, branch_kwargs, batch)
        return self._pipelined(step, branch_args, branch_kwargs, batch, last=step == window[1])

    def _gather(self, local: torch.Tensor, split: BatchSplit) -> torch.Tensor:
        full = super()._gather(local, split)
        if self._measure and full is not local:
            # The prediction (the first gathered tensor) measures the branch gap, identically on every rank.
            self._measure = False
            half = split.batch // 2
            self._rates.push(relative_gap(full[:half], full[half:]))
        return full

    def _make_executor(
        self,
        adapter: DenoiserAdapter,
        stages: list[list[Segment]],
        edges: Sequence[TensorEdge],
        device: torch.device,
    ) -> StageExecutor:
        if len(stages) != self.k:
            raise ValueError(
                f"the plan has {len(stages)} stages, but each CFG group of {self.k} ranks pipelines its "
                f"branch over {self.k} stages: make the plan with devices={self.k} "
                f"(accel plan ... --devices {self.k})."
            )
        group = self.comm.layout.groups[self.branch]
        return StageExecutor(
            adapter, stages, edges, stage=self.position, peers=group, device=device, group=self.comm.group
        )

    def _prime(self, step: int, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int) -> Any:
        """First window step: the whole branch on every rank of the group, keeping this stage's inputs."""
        executor = self._executor
        assert executor is not None
        executor.drain()
        output, captured = executor.forward_capturing(args, kwargs, slot=(step + 1) % 2)
        self._template = output
        # Every rank of a group holds its branch whole: gather one copy per group, over the stride.
        split = BatchSplit(batch=batch, world_size=self.comm.world_size, parts=2)
        self._measure = True
        result = _map_output(output, lambda local: self._gather(local, split))
        prediction = first_tensor(output)
        self._record(step, "pipeline", self._all_units(), [], captured)
        self.stats.pipeline_bytes += prediction.numel() * prediction.element_size()
        return result

    def _pipelined(
        self, step: int, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, *, last: bool
    ) -> Any:
        executor = self._executor
        assert executor is not None
        output, units, sent = executor.step(args, kwargs, slot=step % 2, last=last)
        template = first_tensor(self._template)
        mine = (
            first_tensor(output).contiguous() if output is not None else executor.placeholder_like(template)
        )
        gathered = self.comm.all_gather(mine)
        # Rank-major: keep the last stage's rank of each group (the others sent zeros).
        owners = [g * self.k + executor.last_stage for g in range(2)]
        full = gathered.view(self.comm.world_size, *mine.shape)[owners].reshape(batch, *mine.shape[1:])
        sent.append((PREDICTION, mine.numel() * mine.element_size()))
        boundary = sum(n for name, n in sent if name != PREDICTION)
        self.comm.stats.bytes_sent += boundary  # the all-gather counted the prediction already
        self.stats.pipeline_bytes += boundary + mine.numel() * mine.element_size()
        self._rates.skip()
        self._record(step, "pipeline", units, sent)
        return _map_output(self._template, lambda _t: full)
