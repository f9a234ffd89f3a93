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

from collections.abc import Callable, Sequence
from typing import Any

import torch

from accel.models import DenoiserAdapter, TensorEdge
from accel.runtime.comm import Communicator
from accel.runtime.guidance import BatchSplit, _map_output
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

    # -- the hook ----------------------------------------------------------------------------------
    def _guided_call(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, step: int
    ) -> Any:
        phase = self._enter(step, module, args, kwargs, batch)
        if phase == "cfg":
            measured = len(self.state.rates)
            output = self._split_forward(args, kwargs, self._gap_meter())
            if len(self.state.rates) == measured:  # nothing was gathered
                self.state.rates.skip()
            self._record(step, "cfg", self._all_units(), [])
            return output
        self.state.calls += 1
        self.state.split_calls += 1
        window = self.state.window
        assert window is not None and self.state.executor is not None
        branch_args, branch_kwargs = self._branch_inputs(args, kwargs, batch, self.branch)
        if step == window[0]:
            return self._prime(step, branch_args, branch_kwargs, batch)
        return self._pipelined(step, branch_args, branch_kwargs, batch, last=step == window[1])

    def _gap_meter(self) -> Callable[[torch.Tensor, torch.Tensor, BatchSplit], None]:
        """A gather callback measuring the branch gap on the step's first gathered tensor (the prediction),
        identically on every rank."""
        pending = True

        def measure(local: torch.Tensor, full: torch.Tensor, split: BatchSplit) -> None:
            nonlocal pending
            if pending:
                pending = False
                half = split.batch // 2
                self.state.rates.push(relative_gap(full[:half], full[half:]))

        return measure

    def _make_executor(
        self,
        adapter: DenoiserAdapter,
        stages: list[list[Segment]],
        edges: Sequence[TensorEdge],
        device: torch.device,
    ) -> StageExecutor:
        group = self.comm.layout.groups[self.branch]
        return StageExecutor(
            adapter, stages, edges, stage=self.position, peers=group, device=device, group=self.comm.group
        )

    def _prime(self, step: int, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int) -> Any:
        """First window step: the whole branch on every rank of the group, keeping this stage's inputs."""
        executor = self.state.executor
        assert executor is not None
        executor.drain()
        output, captured = executor.forward_capturing(args, kwargs, slot=(step + 1) % 2)
        self.state.template = output
        # Every rank of a group holds its branch whole: gather one copy per group, over the stride.
        split = BatchSplit(batch=batch, world_size=self.comm.world_size, parts=2)
        result = self._gather_output(output, split, self._gap_meter())
        prediction = first_tensor(output)
        self._record(step, "pipeline", self._all_units(), [], captured)
        self.state.stats.pipeline_bytes += prediction.numel() * prediction.element_size()
        return result

    def _pipelined(
        self, step: int, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, *, last: bool
    ) -> Any:
        executor = self.state.executor
        assert executor is not None
        output, units, sent = executor.step(args, kwargs, slot=step % 2, last=last)
        template = first_tensor(self.state.template)
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
        self.state.stats.pipeline_bytes += boundary + mine.numel() * mine.element_size()
        self.state.rates.skip()
        self._record(step, "pipeline", units, sent)
        return _map_output(self.state.template, lambda _t: full)
