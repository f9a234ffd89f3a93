"""The hybrid runtime: CFG split outside the window, a stale-activation 2-stage pipeline inside it.

Outside the window every rank runs the whole denoiser on its guidance branch (rank 0 unconditional,
rank 1 conditional) and the prediction is all-gathered, exactly as :class:`CFGSplitHook` does. The
relative gap between the branches is measured from the gathered prediction on every rank alike (no extra
collective) and read one step later to decide the window (:mod:`accel.runtime.schedule`).

Inside the window rank ``k`` runs only plan stage ``k``'s unit segments, on the boundary tensors the
other stage produced at the previous step. Only the plan's boundary tensors move (``batch_isend_irecv``
into preallocated, double-buffered receive buffers), plus the prediction, which the owner of the last
unit sends so that every rank applies guidance and the scheduler step itself (latents stay identical).
The window starts from boundary tensors captured during the last CFG step (through the adapter's
segmented forward, which equals ``model.forward`` bit for bit), so no priming forward is needed.

Window guidance (``window_guidance``):

- ``reference``: the published window guidance. Stage inputs carry the conditioning each rank holds
  (rank 0 unconditional, rank 1 conditional); the last stage's output is returned for both branches, so
  the pipeline's guidance formula yields it unchanged (guidance dropped). docs/concepts.md lists where it
  differs from the research code (no priming step; rank 0 starts from its own unconditional activations).
- ``cached``: both stages run the conditional branch; the last measured ``d = eps_c - eps_u`` is
  re-applied by returning ``[eps_c - d, eps_c]``, so the pipeline computes ``eps_c + (g - 1) d``.
- ``off``: both stages run the conditional branch; ``[eps_c, eps_c]`` (no guidance).

On CUDA the transfers are NCCL point-to-point operations, which run on NCCL's own stream: the boundary
exchange issued at the end of step ``t`` is waited for only when step ``t + 1`` needs it (the compute
stream waits, the host does not), so it overlaps the pipeline's guidance and scheduler work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from typing_extensions import Unpack

from accel.models import DenoiserAdapter, TensorEdge
from accel.partition import stage_owners
from accel.runtime.comm import Communicator
from accel.runtime.guidance import BatchSplit, SplitState, _map_output
from accel.runtime.schedule import relative_gap
from accel.runtime.stages import (
    PREDICTION,
    TAG_HANDOVER,
    TAG_PREDICTION,
    Key,
    Segment,
    StageExecutor,
    first_tensor,
)
from accel.runtime.window import HybridCallStats, StepRecord, WindowHook, WindowOptions, WindowState

log = logging.getLogger(__name__)

__all__ = ["PREDICTION", "HybridCallStats", "HybridHook", "PairStageExecutor", "StepRecord"]


class PairStageExecutor(StageExecutor):
    """Runs one plan stage of a 2-stage pipeline on 2 ranks, and sends the prediction to the other rank.

    Args:
        adapter: the denoiser adapter.
        stages: unit segments ``[lo, hi)`` per stage (from the plan).
        edges: every tensor edge between units at this shape (``adapter.trace``).
        rank: this rank; ``peer`` is the other one. Rank 1 (the conditional branch in CFG steps) runs the
            stage that owns the last unit, rank 0 the other (``stage``, ``peer_stage``).
        device: where the buffers live.
        group: the process group of the two ranks (``None``: the default group).
    """

    def __init__(
        self,
        adapter: DenoiserAdapter,
        stages: Sequence[Sequence[Segment]],
        edges: Sequence[TensorEdge],
        *,
        rank: int,
        device: torch.device,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        last_stage = stage_owners(stages, len(adapter.units))[-1]
        # The conditional rank (1) runs the stage that produces the prediction, as in the published code
        # (later stages conditional, earlier ones unconditional; for an onion the outer stage is "later").
        stage = last_stage if rank == 1 else 1 - last_stage
        peers = [rank if k == stage else 1 - rank for k in range(2)]
        super().__init__(adapter, stages, edges, stage=stage, peers=peers, device=device, group=group)
        self.rank = rank
        self.peer = 1 - rank
        self.peer_stage = 1 - stage
        self.handover: dict[Key, torch.Tensor] = {}
        self._prediction: torch.Tensor | None = None

    # -- CFG steps ---------------------------------------------------------------------------------
    def capture(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, slot: int, own: bool, for_peer: bool
    ) -> tuple[Any, list[str]]:
        """The whole denoiser (:meth:`forward_capturing`), keeping this stage's input boundary tensors in
        receive slot ``slot`` (with ``own``) and the peer stage's (with ``for_peer``, to hand over when the
        window starts)."""
        extra: dict[Key, torch.Tensor] = {}
        if for_peer:
            for key in self.inputs_of[self.peer_stage]:
                if key not in self.handover:
                    self.handover[key] = self.buffer(key)
                extra[key] = self.handover[key]
        return self.forward_capturing(args, kwargs, slot=slot if own else None, extra=extra)

    # -- window steps ------------------------------------------------------------------------------
    def start_window(self, *, slot: int, handover: bool) -> int:
        """Called in the first window step; with ``handover`` the conditional rank (1) sends the inputs of
        rank 0's stage captured on its branch (rank 0 captured none). Returns the bytes sent."""
        self.drain()
        keys = self.inputs_of[self.stage if self.rank == 0 else self.peer_stage]
        if not handover or not keys:
            return 0
        ops = []
        sent = 0
        if self.rank == 1:
            for key in keys:
                ops.append(dist.P2POp(dist.isend, self.handover[key], 0, self.group, TAG_HANDOVER))
                sent += self.nbytes(key)
        else:
            for key in keys:
                ops.append(dist.P2POp(dist.irecv, self.slots[slot][key], 1, self.group, TAG_HANDOVER))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return sent

    def pair_step(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, slot: int, last: bool
    ) -> tuple[torch.Tensor, list[int], list[tuple[str, int]]]:
        """One pipelined step (:meth:`step`) whose prediction the rank of the last stage sends to the other:
        returns the prediction (every rank), the units run and what was sent."""
        output, units, sent = self.step(args, kwargs, slot=slot, last=last)
        if output is not None:
            prediction = first_tensor(output).contiguous()
            _wait(dist.isend(prediction, self.peer, self.group, tag=TAG_PREDICTION))
            sent.append((PREDICTION, prediction.numel() * prediction.element_size()))
        else:
            buffer = self._prediction
            if buffer is None:
                raise RuntimeError("set_prediction_like() must run before the first pipelined step.")
            _wait(dist.irecv(buffer, self.peer, self.group, tag=TAG_PREDICTION))
            prediction = buffer.clone()  # the buffer is reused next step
        return prediction, units, sent

    def set_prediction_like(self, local: torch.Tensor) -> None:
        """Size the prediction receive buffer from a CFG step's local prediction."""
        p = self._prediction
        if p is None or p.shape != local.shape or p.dtype != local.dtype:
            self._prediction = torch.empty_like(local, memory_format=torch.contiguous_format)


def _wait(work: Any) -> None:
    if work is not None:
        work.wait()


@dataclass
class HybridState(WindowState[PairStageExecutor]):
    """Per-call state of :class:`HybridHook`: the window's, plus the CFG step whose activations start the
    window (``captured_at``) and the branch difference measured there (``delta``, ``cached`` guidance)."""

    captured_at: int | None = None
    delta: torch.Tensor | None = None


class HybridHook(WindowHook[PairStageExecutor]):
    """CFG split plus the pipelined window (see the module docstring); world size 2.

    Args:
        comm: the communicator (2 ranks).
        owns_result: see :class:`CFGSplitHook`.
        window_guidance: ``"reference"``, ``"cached"`` or ``"off"``.
        options: ``guided``, ``num_steps``, ``schedule``, ``get_plan`` (2-stage plans), ``runner`` and
            ``vae_scale_factor``, as :class:`WindowHook` takes them.

    ``recorder``: set to a callable to receive a :class:`StepRecord` per denoiser call (tests).
    """

    State: type[SplitState] = HybridState
    state: HybridState

    def __init__(
        self,
        comm: Communicator,
        owns_result: Callable[[], bool],
        *,
        window_guidance: str,
        **options: Unpack[WindowOptions],
    ) -> None:
        self.window_guidance = window_guidance
        super().__init__(comm, owns_result, **options)

    def _check_world(self, comm: Communicator) -> None:
        if comm.world_size != 2:
            raise ValueError(
                f"the 2-rank hybrid runtime runs on 2 ranks, not {comm.world_size}; on 2k > 2 ranks use "
                "GroupPipelineHook (accel.runtime.group_pipeline)."
            )

    # -- the hook ----------------------------------------------------------------------------------
    def _guided_call(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, step: int
    ) -> Any:
        self.state.calls += 1
        split = self.split_for(batch)
        phase = self._enter(step, module, args, kwargs, batch)
        if phase == "pipeline":
            return self._pipelined(step, args, kwargs, batch)
        return self._cfg_step(step, self._original_forward(), args, kwargs, batch, split)

    def _make_executor(
        self,
        adapter: DenoiserAdapter,
        stages: list[list[Segment]],
        edges: Sequence[TensorEdge],
        device: torch.device,
    ) -> PairStageExecutor:
        return PairStageExecutor(
            adapter, stages, edges, rank=self.comm.rank, device=device, group=self.comm.group
        )

    def _check_start(self, window: tuple[int, int] | None, step: int) -> tuple[int, int] | None:
        if window is not None and window[0] <= step and self.state.captured_at != window[0] - 1:
            # No activations were captured for this start (cannot happen with the rules here).
            log.warning("no activations captured before step %d: the window is skipped", step)
            return None
        return window

    def _capture_now(self, step: int) -> bool:
        """Whether this CFG step may be the last one before the window (its activations start it)."""
        schedule = self.state.schedule
        if schedule is None or self.state.executor is None:
            return False
        total = self.state.steps_total if self.state.steps_total is not None else 2**31
        if step + 1 > total - 1:
            return False
        if self.state.decided:
            return self.state.window is not None and step == self.state.window[0] - 1
        if schedule.mode == "adaptive":
            return (step >= schedule.lookback or step == schedule.tau_cap) and step <= schedule.tau_cap
        return False

    def _cfg_step(
        self,
        step: int,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        batch: int,
        split: BatchSplit,
    ) -> Any:
        b_args, b_kwargs = self._branch_inputs(args, kwargs, batch, self.branch)
        executor = self.state.executor
        captured: list[str] = []
        if executor is not None and self._capture_now(step):
            # reference: each rank starts from its own branch; cached/off: both stages run the conditional
            # branch, so the conditional rank (1) also keeps stage 0's inputs and hands them over.
            handover = self.window_guidance != "reference"
            for_peer = handover and self.comm.rank == 1
            own = not (handover and self.comm.rank == 0)
            output, captured = executor.capture(
                b_args, b_kwargs, slot=(step + 1) % 2, own=own, for_peer=for_peer
            )
            self.state.captured_at = step
            self.state.template = output
            executor.set_prediction_like(first_tensor(output))
        else:
            output = forward(*b_args, **b_kwargs)
        self.state.split_calls += 1
        capture = self.state.captured_at == step
        sent: list[tuple[str, int]] = []

        def gathered(local: torch.Tensor, full: torch.Tensor, split: BatchSplit) -> None:
            sent.append((PREDICTION, local.numel() * local.element_size()))
            if len(sent) == 1:  # the prediction (the first gathered tensor) measures the branch gap
                uncond, cond = full[: split.rows], full[split.rows :]
                self.state.rates.push(relative_gap(uncond, cond))
                if capture and self.window_guidance == "cached":
                    self.state.delta = cond - uncond

        result = self._gather_output(output, split, gathered)
        if not sent:
            self.state.rates.skip()
        self._record(step, "cfg", self._all_units(), sent, captured)
        return result

    def _pipelined(self, step: int, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int) -> Any:
        executor = self.state.executor
        window = self.state.window
        assert executor is not None and window is not None
        mode = self.window_guidance
        branch = self.comm.rank if mode == "reference" else 1  # rank 0 uncond, rank 1 cond (reference)
        b_args, b_kwargs = self._branch_inputs(args, kwargs, batch, branch)
        slot = step % 2
        sent_bytes = 0
        if step == window[0]:
            sent_bytes += executor.start_window(slot=slot, handover=mode != "reference")
        prediction, units, sent = executor.pair_step(b_args, b_kwargs, slot=slot, last=step == window[1])
        if step == window[0] and sent_bytes:
            sent.insert(0, ("handover", sent_bytes))
        step_bytes = sum(n for _, n in sent)
        self.comm.stats.bytes_sent += step_bytes
        self.state.stats.pipeline_bytes += step_bytes
        self.state.rates.skip()
        if mode == "cached":
            delta = self.state.delta
            assert delta is not None
            full = torch.cat([prediction - delta, prediction])
        else:
            full = torch.cat([prediction, prediction])
        self._record(step, "pipeline", units, sent)
        return _map_output(self.state.template, lambda _t: full)
