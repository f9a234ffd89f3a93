"""The partitioner finds the optimal chain and onion cuts (checked against brute force)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from accel.models.base import TensorEdge
from accel.partition import PartitionError, evaluate, partition, partition_chain, partition_onion


def _edge(producer: int, consumer: int, nbytes: int, name: str = "t") -> TensorEdge:
    return TensorEdge(
        name=name, producer=producer, consumer=consumer, shape=(nbytes,), dtype="uint8", nbytes=nbytes
    )


def _brute_cost(
    costs: list[float], stages: list[list[tuple[int, int]]], edges: list[TensorEdge], gbps: float
) -> float:
    """The slowest stage, computed the slow, obvious way: compute + bytes in and out over the link."""
    owner = {i: k for k, segs in enumerate(stages) for lo, hi in segs for i in range(lo, hi)}
    worst = 0.0
    for k, segs in enumerate(stages):
        compute = sum(costs[i] for lo, hi in segs for i in range(lo, hi))
        moved = sum(e.nbytes for e in edges if (owner[e.producer] == k) != (owner[e.consumer] == k))
        worst = max(worst, compute + moved / (gbps * 1e9) * 1e3)
    return worst


def _all_chains(n_units: int, n: int):
    for cuts in itertools.combinations(range(1, n_units), n - 1):
        bounds = [0, *cuts, n_units]
        yield [[(bounds[k], bounds[k + 1])] for k in range(n)]


def _all_onions(n_units: int, n: int):
    for points in itertools.combinations_with_replacement(range(n_units + 1), 2 * (n - 1)):
        heads = [0, *points[: n - 1]]
        tails = [n_units, *reversed(points[n - 1 :])]
        if heads[-1] >= tails[-1]:
            continue
        stages = []
        for k in range(n - 1):
            segs = [s for s in ((heads[k], heads[k + 1]), (tails[k + 1], tails[k])) if s[0] < s[1]]
            if not segs:
                break
            stages.append(segs)
        else:
            stages.append([(heads[-1], tails[-1])])
            yield stages


def _random_problem(rng: random.Random, n_units: int) -> tuple[list[float], list[TensorEdge]]:
    costs = [rng.uniform(0.1, 10.0) for _ in range(n_units)]
    # A chain of carries, nested skips (as in a U-Net), and a few arbitrary long edges.
    edges = [_edge(i, i + 1, rng.randint(1, 8) * 10**6) for i in range(n_units - 1)]
    lo, hi = 0, n_units - 1
    while hi - lo > 2 and rng.random() < 0.8:
        edges.append(_edge(lo, hi, rng.randint(1, 8) * 10**6, "skip"))
        lo, hi = lo + rng.randint(1, 2), hi - rng.randint(1, 2)
    for _ in range(rng.randint(0, 3)):
        a, b = sorted(rng.sample(range(n_units), 2))
        edges.append(_edge(a, b, rng.randint(1, 8) * 10**6, "long"))
    return costs, edges


@pytest.mark.parametrize("n", [2, 3, 4])
def test_chain_is_optimal(n: int) -> None:
    rng = random.Random(100 + n)
    for _ in range(25):
        n_units = rng.randint(n, 11)
        costs, edges = _random_problem(rng, n_units)
        gbps = rng.choice([0.5, 5.0, 1e4])
        got = partition_chain(costs, n, edges, gbps)
        best = min(_brute_cost(costs, s, edges, gbps) for s in _all_chains(n_units, n))
        assert got.objective_ms == pytest.approx(best, rel=1e-9)
        assert got.objective_ms == pytest.approx(
            _brute_cost(costs, [s.segments for s in got.stages], edges, gbps)
        )
        assert all(len(s.segments) == 1 for s in got.stages)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_onion_is_optimal(n: int) -> None:
    rng = random.Random(200 + n)
    for _ in range(20):
        n_units = rng.randint(n, 10 if n < 4 else 9)
        costs, edges = _random_problem(rng, n_units)
        gbps = rng.choice([0.5, 5.0, 1e4])
        got = partition_onion(costs, n, edges, gbps)
        best = min(_brute_cost(costs, s, edges, gbps) for s in _all_onions(n_units, n))
        assert got.objective_ms == pytest.approx(best, rel=1e-9)
        assert got.objective_ms == pytest.approx(
            _brute_cost(costs, [s.segments for s in got.stages], edges, gbps)
        )
        assert got.layout == "onion"
        assert sorted(i for s in got.stages for i in s.units()) == list(range(n_units))


def test_onion_keeps_skips_local_where_chain_cannot() -> None:
    # A U-Net-like problem: heavy skip edges between mirrored units; the onion cuts only the thin chain.
    n_units = 12
    costs = [1.0] * n_units
    edges = [_edge(i, i + 1, 10**6, "carry") for i in range(n_units - 1)]
    edges += [_edge(i, n_units - 1 - i, 50 * 10**6, "skip") for i in range(n_units // 2 - 1)]
    onion, chain = partition_onion(costs, 2, edges, 1.0), partition_chain(costs, 2, edges, 1.0)
    assert onion.bytes_per_step == 2 * 10**6
    assert chain.bytes_per_step > onion.bytes_per_step
    best = partition(costs, 2, edges, family="unet", link_gbps=1.0)
    assert best.layout == "onion" and best.objective_ms == onion.objective_ms
    assert partition(costs, 2, edges, family="dit", link_gbps=1.0).layout == "chain"
    assert partition(costs, 2, edges, family="unet", link_gbps=1.0, layout="chain").layout == "chain"
    stage0, stage1 = onion.stages
    assert len(stage0.segments) == 2 and len(stage1.segments) == 1
    assert {e.name for e in onion.boundary} == {"carry"}
    assert stage0.bytes_in == stage0.bytes_out == 10**6
    assert stage0.comm_ms == pytest.approx(2 * 10**6 / 1e9 * 1e3)


def test_report_fields_and_balance() -> None:
    costs = [3.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    got = partition_chain(costs, 2, [], math.inf)
    assert [s.segments for s in got.stages] == [[(0, 3)], [(3, 6)]]
    assert [s.cost_ms for s in got.stages] == [5.0, 5.0]
    assert got.balance == 1.0 and got.bytes_per_step == 0 and got.boundary == []
    assert got.stage_of_units() == [0, 0, 0, 1, 1, 1]
    uneven = evaluate(costs, [[(0, 1)], [(1, 6)]], [_edge(0, 1, 10**9)], link_gbps=1.0)
    assert uneven.stages[1].compute_ms == 7.0 and uneven.stages[1].comm_ms == pytest.approx(1000.0)
    assert uneven.balance == pytest.approx(1007.0 / ((1003.0 + 1007.0) / 2))
    single = partition_onion(costs, 1, [])
    assert [s.segments for s in single.stages] == [[(0, 6)]]


def test_invalid_problems_are_refused_with_the_reason() -> None:
    with pytest.raises(PartitionError, match="cannot cut 3 units into 4"):
        partition_chain([1.0, 1.0, 1.0], 4)
    with pytest.raises(PartitionError, match="non-negative"):
        partition_onion([1.0, -1.0], 2)
    with pytest.raises(PartitionError, match="link_gbps"):
        partition_chain([1.0, 1.0], 2, [], 0.0)
    with pytest.raises(PartitionError, match="layout"):
        partition([1.0, 1.0], 2, layout="ring")
    with pytest.raises(PartitionError, match="unit 1 is in no stage"):
        evaluate([1.0, 1.0], [[(0, 1)]])


def test_large_onion_is_fast_enough() -> None:
    # Full-size SDXL has ~93 units; 4 devices must stay interactive.
    rng = random.Random(7)
    costs, edges = _random_problem(rng, 93)
    got = partition(costs, 4, edges, family="unet")
    assert len(got.stages) == 4 and got.balance < 1.5
