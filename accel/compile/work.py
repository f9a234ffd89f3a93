"""What torch's compiler did over a span of a run, read from its process-wide counters.

torch-free at import (the command line formats these without importing torch); :meth:`CompilerWork.now`
imports it when counting.
"""

from __future__ import annotations

import operator
from dataclasses import astuple, dataclass


@dataclass(frozen=True)
class CompilerWork:
    """What torch's compiler did over a span, from its process-wide counters: graphs it generated code
    for (``graphs_generated``: inductor FX-graph cache misses), graphs it read back from its cache
    (``graphs_cached``), and kernel benchmarks it ran (``kernel_benchmarks``: autotuning and
    coordinate-descent searches). A stage served entirely by its engine generates nothing and benchmarks
    nothing."""

    graphs_generated: int = 0
    graphs_cached: int = 0
    kernel_benchmarks: int = 0

    @classmethod
    def now(cls) -> CompilerWork:
        """The counters' current totals in this process."""
        from torch._dynamo.utils import counters

        inductor = counters["inductor"]
        return cls(
            graphs_generated=inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_bypass"],
            graphs_cached=inductor["fxgraph_cache_hit"],
            kernel_benchmarks=sum(n for name, n in inductor.items() if name.startswith("benchmarking.")),
        )

    def __add__(self, other: CompilerWork) -> CompilerWork:
        return CompilerWork(*map(operator.add, astuple(self), astuple(other)))

    def since(self, before: CompilerWork) -> CompilerWork:
        """The work counted between ``before`` and these totals (``torch._dynamo.reset()`` zeroes the
        counters: what was counted before a reset is not subtracted twice)."""
        pairs = zip(astuple(self), astuple(before), strict=True)
        return CompilerWork(*(now - then if now >= then else now for now, then in pairs))

    def describe(self) -> str:
        """One line for logs and summaries."""
        return (
            f"{self.graphs_generated} graph(s) generated, {self.graphs_cached} read from the cache, "
            f"{self.kernel_benchmarks} kernel benchmark call(s)"
        )
