"""The rank layout on ``2k`` processes: two CFG groups of ``k`` ranks, and the blocks that share work.

Ranks ``[0, k)`` form CFG group 0 (the unconditional branch), ranks ``[k, 2k)`` group 1 (the conditional
branch). A denoiser call of ``rows`` batch rows is cut into ``parts = gcd(rows, 2k)`` contiguous parts
(:class:`~accel.runtime.guidance.BatchSplit`); with classifier-free guidance (``rows = 2B``) that is
``2 * gcd(B, k)`` parts, so the first half of the parts (the unconditional rows) lands on group 0 and the
second half on group 1, and each branch's ``B`` rows split ``gcd(B, k)`` ways inside its group.

The ``size = 2k / parts`` consecutive ranks that share one part form a *block*: they run their part
together (sequence-parallel attention for DiTs, :mod:`accel.runtime.sequence`) or each run all of it
(U-Nets). The ranks at the same position in every block form a *stride*: between them they hold every
part exactly once, so the prediction is all-gathered over the stride, never duplicated.

Everything here is pure (no process groups); :meth:`accel.runtime.comm.Communicator.create_groups`
creates one process group per block and per stride from this layout, once per Accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass

from accel.errors import AccelError
from accel.settings import check_count, check_world_size


class LayoutError(AccelError, ValueError):
    """The world size or a block size does not fit the CFG group layout; the message names the fix."""


@dataclass(frozen=True)
class GroupLayout:
    """Which rank does what on ``world_size`` processes (1, or an even count ``2k``).

    Attributes:
        world_size: total number of ranks.
    """

    world_size: int

    def __post_init__(self) -> None:
        check_count("the world size", self.world_size, LayoutError)
        check_world_size(self.world_size, error=LayoutError)

    @property
    def group_size(self) -> int:
        """``k``: ranks per CFG group (1 with one or two processes)."""
        return max(1, self.world_size // 2)

    @property
    def window_stages(self) -> int:
        """Stages of the hybrid window's plan: one per rank on 1 or 2 processes, ``k`` on ``2k > 2`` (each
        CFG group pipelines its own branch over its ``k`` ranks)."""
        return self.world_size if self.world_size <= 2 else self.group_size

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """The CFG groups' ranks: group 0 runs the unconditional branch, group 1 the conditional one."""
        k = self.group_size
        return tuple(tuple(range(g * k, (g + 1) * k)) for g in range(self.world_size // k))

    def group_of(self, rank: int) -> int:
        """The CFG group of ``rank`` (0: unconditional branch, 1: conditional branch)."""
        self._check_rank(rank)
        return rank // self.group_size

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Block sizes that need process groups of their own: divisors of the world size strictly between
        1 and the world size (a block of 1 is a single rank, a block of the world is the default group)."""
        return tuple(s for s in range(2, self.world_size) if self.world_size % s == 0)

    def blocks(self, size: int) -> tuple[tuple[int, ...], ...]:
        """Every block of ``size`` consecutive ranks, in rank order."""
        self._check_size(size)
        return tuple(tuple(range(b, b + size)) for b in range(0, self.world_size, size))

    def strides(self, size: int) -> tuple[tuple[int, ...], ...]:
        """For blocks of ``size``: the ranks at each position ``0 .. size-1`` of every block, in block order."""
        self._check_size(size)
        return tuple(tuple(range(p, self.world_size, size)) for p in range(size))

    def block_of(self, size: int, rank: int) -> tuple[int, ...]:
        """The block of ``size`` ranks that holds ``rank``."""
        self._check_rank(rank)
        return self.blocks(size)[rank // size]

    def stride_of(self, size: int, rank: int) -> tuple[int, ...]:
        """The stride (one rank per block of ``size``) that holds ``rank``."""
        self._check_rank(rank)
        return self.strides(size)[rank % size]

    def describe(self) -> str:
        """One line for logs: the CFG groups and their ranks."""
        if self.world_size == 1:
            return "1 rank: no CFG groups"
        names = ("unconditional", "conditional")
        return "; ".join(
            f"CFG group {g} ({names[g]}): ranks {list(ranks)}" for g, ranks in enumerate(self.groups)
        )

    def _check_size(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or self.world_size % size:
            raise LayoutError(
                f"block size {size!r} does not divide the world size {self.world_size}; blocks are the "
                f"ranks sharing one part of the batch, so their size is a divisor of {self.world_size}."
            )

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside [0, {self.world_size}).")
