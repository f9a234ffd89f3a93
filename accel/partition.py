"""Min-max stage partitioning of a denoiser's units across devices.

A stage is a set of unit-index segments ``[lo, hi)``. Its cost is its compute time (the sum of its units'
measured times) plus the time to move its boundary tensors over one link: every tensor it receives from
or sends to another stage, ``(bytes_in + bytes_out) / link``. In the pipelined window all stages run at
once, so a step takes as long as the slowest stage; the partitioner minimises that maximum, exactly.

Layouts:
- ``chain``: stage ``k`` owns one contiguous range; stage 0 the first. The natural cut for DiTs.
- ``onion``: stage 0 owns a head ``[0, a1)`` and a tail ``[b1, N)``, stage 1 ``[a1, a2)`` and
  ``[b2, b1)``, ..., the innermost stage the middle ``[a_{n-1}, b_{n-1})``. On a U-Net this keeps each
  skip connection on the stage that produced it when that is cheaper; a head or tail may be empty.

Both are solved to optimality by dynamic programming over cut points (chain ``O(n N^2)``, onion
``O(n N^4)`` vectorised), using 2-D prefix sums of the edge bytes so that any stage's traffic costs O(1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from accel.errors import AccelError
from accel.models.base import TensorEdge

#: Default link bandwidth in GB/s (1e9 bytes per second): a conservative figure for GPU peer links.
DEFAULT_LINK_GBPS = 50.0
LAYOUTS = ("chain", "onion")


class PartitionError(AccelError, ValueError):
    """The partitioning problem is invalid (too few units, bad costs or bandwidth)."""


@dataclass
class Stage:
    """One device's share: unit segments ``[lo, hi)`` and what they cost per step.

    ``cost_ms`` is ``compute_ms + comm_ms``; ``comm_ms`` moves ``bytes_in + bytes_out`` over the link.
    """

    segments: list[tuple[int, int]]
    cost_ms: float
    compute_ms: float = 0.0
    comm_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0

    def units(self) -> list[int]:
        """The unit indices of this stage, in execution order."""
        return [i for lo, hi in self.segments for i in range(lo, hi)]


@dataclass
class Partition:
    """Stages for ``n`` devices, the tensors that cross between them, and how well they balance.

    Attributes:
        stages: one per device, in pipeline order (onion: outermost first).
        boundary: every edge whose producer and consumer are on different stages; each moves once per step.
        bytes_per_step: total bytes of ``boundary``.
        balance: slowest stage cost over the mean stage cost (1.0 is perfect).
        layout: ``"chain"`` or ``"onion"``.
        link_gbps: the link bandwidth (GB/s) used for the communication term.
    """

    stages: list[Stage]
    boundary: list[TensorEdge] = field(default_factory=list)
    bytes_per_step: int = 0
    balance: float = 1.0
    layout: str = "chain"
    link_gbps: float = DEFAULT_LINK_GBPS

    @property
    def objective_ms(self) -> float:
        """The slowest stage's cost: what the partitioner minimised."""
        return max(s.cost_ms for s in self.stages)

    def stage_of_units(self) -> list[int]:
        """For each unit index, the stage that runs it."""
        n_units = sum(hi - lo for s in self.stages for lo, hi in s.segments)
        owner = [-1] * n_units
        for k, stage in enumerate(self.stages):
            for i in stage.units():
                owner[i] = k
        return owner


def _ms_per_byte(link_gbps: float) -> float:
    if not link_gbps > 0:
        raise PartitionError(f"link_gbps must be > 0 (GB/s), got {link_gbps!r}.")
    return 0.0 if math.isinf(link_gbps) else 1e3 / (link_gbps * 1e9)


def _check(costs: Sequence[float], n: int) -> np.ndarray:
    array = np.asarray(costs, dtype=np.float64)
    if array.ndim != 1 or not np.all(np.isfinite(array)) or np.any(array < 0):
        raise PartitionError("costs must be a list of finite, non-negative unit costs (ms).")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PartitionError(f"the number of stages must be a positive integer, got {n!r}.")
    if n > len(array):
        raise PartitionError(
            f"cannot cut {len(array)} units into {n} non-empty stages; use at most {len(array)} devices."
        )
    return array


def _inner_edges(edges: Sequence[TensorEdge], n_units: int) -> list[TensorEdge]:
    """Edges between two units (prepare/finish hand-offs are local to every stage and cost nothing)."""
    return [e for e in edges if 0 <= e.producer < e.consumer < n_units]


def stage_owners(stages: Sequence[Sequence[tuple[int, int]]], n_units: int) -> list[int]:
    """For each of ``n_units`` unit indices, the stage whose segments hold it.

    Raises :class:`PartitionError` when a segment is empty or out of range, or a unit is in no stage or two.
    """
    owner = [-1] * n_units
    for k, segments in enumerate(stages):
        for lo, hi in segments:
            if not 0 <= lo < hi <= n_units:
                raise PartitionError(f"stage {k} segment [{lo}, {hi}) is empty or outside [0, {n_units}).")
            for i in range(lo, hi):
                if owner[i] != -1:
                    raise PartitionError(f"unit {i} is in stage {owner[i]} and stage {k}.")
                owner[i] = k
    if -1 in owner:
        raise PartitionError(f"unit {owner.index(-1)} is in no stage.")
    return owner


def evaluate(
    costs: Sequence[float] | np.ndarray,
    stages: Sequence[Sequence[tuple[int, int]]],
    edges: Sequence[TensorEdge] = (),
    link_gbps: float = DEFAULT_LINK_GBPS,
    layout: str = "chain",
) -> Partition:
    """Cost out a given assignment of unit segments to stages (also used to report any plan)."""
    cost = np.asarray(costs, dtype=np.float64)
    n_units = len(cost)
    ms_per_byte = _ms_per_byte(link_gbps)
    owner = stage_owners(stages, n_units)
    inner = _inner_edges(edges, n_units)
    boundary = [e for e in inner if owner[e.producer] != owner[e.consumer]]
    result: list[Stage] = []
    for k, segments in enumerate(stages):
        compute = float(sum(cost[lo:hi].sum() for lo, hi in segments))
        bytes_in = sum(e.nbytes for e in boundary if owner[e.consumer] == k)
        bytes_out = sum(e.nbytes for e in boundary if owner[e.producer] == k)
        comm = (bytes_in + bytes_out) * ms_per_byte
        result.append(
            Stage(
                segments=[(int(lo), int(hi)) for lo, hi in segments],
                cost_ms=compute + comm,
                compute_ms=compute,
                comm_ms=comm,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
            )
        )
    total = [s.cost_ms for s in result]
    mean = sum(total) / len(total)
    return Partition(
        stages=result,
        boundary=boundary,
        bytes_per_step=sum(e.nbytes for e in boundary),
        balance=max(total) / mean if mean > 0 else 1.0,
        layout=layout,
        link_gbps=link_gbps,
    )


class _Tables:
    """Prefix sums that give any stage's compute and traffic in O(1).

    ``A[i, j]`` (i < j) holds the bytes of edges from unit i to unit j. With ``P`` its 2-D prefix sum,
    the bytes inside ``[l, r)`` are ``P[r, r] - P[l, r]`` and the bytes from ``[l1, r1)`` to a later
    ``[l2, r2)`` are a four-corner difference. A stage's traffic is the bytes of edges touching it
    (prefix ``D`` of unit degrees) minus twice the bytes of edges inside it.
    """

    def __init__(self, costs: np.ndarray, edges: Sequence[TensorEdge], ms_per_byte: float) -> None:
        n = len(costs)
        adjacency = np.zeros((n, n), dtype=np.float64)
        for e in _inner_edges(edges, n):
            adjacency[e.producer, e.consumer] += e.nbytes
        self.n = n
        self.k = ms_per_byte
        self.C = np.concatenate([[0.0], np.cumsum(costs)])
        self.D = np.concatenate([[0.0], np.cumsum(adjacency.sum(axis=0) + adjacency.sum(axis=1))])
        self.P = np.zeros((n + 1, n + 1))
        self.P[1:, 1:] = adjacency.cumsum(axis=0).cumsum(axis=1)
        diag = np.diag(self.P)
        self.Q = diag[None, :] - self.P  # Q[l, r]: bytes inside [l, r) (meaningful for l <= r)
        idx = np.arange(n + 1)
        lo, hi = idx[:, None], idx[None, :]
        single = self.C[hi] - self.C[lo] + self.k * (self.D[hi] - self.D[lo] - 2 * self.Q)
        self.G = np.where(lo < hi, single, np.inf)  # G[l, r]: cost of a stage owning just [l, r)


def partition_chain(
    costs: Sequence[float],
    n: int,
    edges: Sequence[TensorEdge] = (),
    link_gbps: float = DEFAULT_LINK_GBPS,
) -> Partition:
    """The optimal contiguous partition into ``n`` non-empty stages (min of the slowest stage)."""
    array = _check(costs, n)
    t = _Tables(array, edges, _ms_per_byte(link_gbps))
    best = t.G[0].copy()  # best[r]: one stage on [0, r)
    parents: list[np.ndarray] = []
    for _ in range(1, n):
        candidates = np.maximum(best[:, None], t.G)  # [l, r]: stages so far end at l, next is [l, r)
        parent = candidates.argmin(axis=0)
        best = candidates[parent, np.arange(t.n + 1)]
        parents.append(parent)
    cuts = [t.n]
    for parent in reversed(parents):
        cuts.append(int(parent[cuts[-1]]))
    cuts.append(0)
    cuts.reverse()
    segments = [[(cuts[k], cuts[k + 1])] for k in range(n)]
    return evaluate(array, segments, edges, link_gbps, layout="chain")


def partition_onion(
    costs: Sequence[float],
    n: int,
    edges: Sequence[TensorEdge] = (),
    link_gbps: float = DEFAULT_LINK_GBPS,
) -> Partition:
    """The optimal nested partition: stage k owns ``[a_k, a_{k+1})`` and ``[b_{k+1}, b_k)``."""
    array = _check(costs, n)
    t = _Tables(array, edges, _ms_per_byte(link_gbps))
    size = t.n + 1
    idx = np.arange(size)
    # f[a, b]: the best slowest-stage cost of the outer stages so far, leaving [a, b) to the inner ones.
    f = np.full((size, size), np.inf)
    f[0, t.n] = 0.0
    parents: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(n - 1):
        new_f = np.full((size, size), np.inf)
        from_a = np.full((size, size), -1)
        from_b = np.full((size, size), -1)
        for a in range(size):
            bs = np.nonzero(np.isfinite(f[a]))[0]
            if len(bs) == 0:
                continue
            b_max = int(bs.max())
            ap = idx[a : b_max + 1][:, None, None]  # inner region starts at a'
            bp = idx[: b_max + 1][None, :, None]  # ... and ends at b'
            bb = bs[None, None, :]
            compute = (t.C[ap] - t.C[a]) + (t.C[bb] - t.C[bp])
            touching = (t.D[ap] - t.D[a]) + (t.D[bb] - t.D[bp])
            inside = t.Q[a, ap] + t.Q[bp, bb] + (t.P[ap, bb] - t.P[a, bb] - t.P[ap, bp] + t.P[a, bp])
            cost = compute + t.k * (touching - 2 * inside)
            valid = (bp > ap) & (bb >= bp) & ((ap - a) + (bb - bp) >= 1)
            total = np.where(valid, np.maximum(cost, f[a, bb]), np.inf)
            pick = total.argmin(axis=2)
            value = np.take_along_axis(total, pick[:, :, None], axis=2)[:, :, 0]
            rows = slice(a, b_max + 1)
            cols = slice(0, b_max + 1)
            better = value < new_f[rows, cols]
            new_f[rows, cols] = np.where(better, value, new_f[rows, cols])
            from_a[rows, cols] = np.where(better, a, from_a[rows, cols])
            from_b[rows, cols] = np.where(better, bs[pick], from_b[rows, cols])
        parents.append((from_a, from_b))
        f = new_f
    final = np.maximum(f, t.G)
    flat_a, flat_b = np.unravel_index(int(np.argmin(final)), final.shape)
    a, b = int(flat_a), int(flat_b)
    if not np.isfinite(final[a, b]):
        raise PartitionError(f"no onion partition of {t.n} units into {n} non-empty stages exists.")
    bounds = [(a, b)]
    for from_a, from_b in reversed(parents):
        a, b = bounds[-1]
        bounds.append((int(from_a[a, b]), int(from_b[a, b])))
    bounds.reverse()  # bounds[k] = (a_k, b_k): the region left to stages k..n-1
    stages: list[list[tuple[int, int]]] = []
    for k in range(n - 1):
        (head, tail), (inner_head, inner_tail) = bounds[k], bounds[k + 1]
        stages.append([seg for seg in ((head, inner_head), (inner_tail, tail)) if seg[0] < seg[1]])
    stages.append([bounds[-1]])
    return evaluate(array, stages, edges, link_gbps, layout="onion")


def partition(
    costs: Sequence[float],
    n: int,
    edges: Sequence[TensorEdge] = (),
    family: str = "dit",
    link_gbps: float = DEFAULT_LINK_GBPS,
    layout: str = "auto",
) -> Partition:
    """The best partition for a denoiser family: chain for DiTs, the better of onion and chain for U-Nets.

    ``layout`` forces ``"chain"`` or ``"onion"``; ``"auto"`` decides by cost (ties: fewer bytes moved).
    """
    if layout not in ("auto", *LAYOUTS):
        raise PartitionError(f"layout={layout!r} is not one of 'auto', 'chain', 'onion'.")
    if family not in ("unet", "dit"):
        raise PartitionError(f"family={family!r} is not 'unet' or 'dit'.")
    if layout == "chain" or (layout == "auto" and family == "dit"):
        return partition_chain(costs, n, edges, link_gbps)
    onion = partition_onion(costs, n, edges, link_gbps)
    if layout == "onion":
        return onion
    chain = partition_chain(costs, n, edges, link_gbps)
    if math.isclose(onion.objective_ms, chain.objective_ms, rel_tol=1e-9, abs_tol=1e-12):
        return onion if onion.bytes_per_step <= chain.bytes_per_step else chain
    return onion if onion.objective_ms < chain.objective_ms else chain
