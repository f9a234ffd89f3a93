"""Adaptive parallelism switching: when the pipelined window starts and ends.

Per CFG step ``i`` the runtime measures the relative gap between the guidance branches,
``r_i = mean|eps_c - eps_u| / (mean|eps_u| + 1e-12)``, from the gathered prediction (identical on every
rank, so the decision needs no extra collective). The rate stays on the device; the rule reads it at the
next step, which costs one host wait per step while the rule is undecided (see :class:`LaggedRates`). The published rule (docs/concepts.md, section 3):

- once ``i >= L``: ``slope_i = (r[i-L+1] - r[i]) / L``;
- ``tau1`` = the first ``i`` with ``0 <= slope_i < eps``; if none qualified by ``i = tau_cap - 1``,
  ``tau1 = tau_cap``;
- ``tau2 = tau1 + k``; the window is the steps ``tau1 + 1 .. tau2`` inclusive, clamped to the last step
  (for the adaptive rule, to the step before it: the final prediction is always exact).

The published constants are for 50 steps; ``ScheduleSettings.resolve`` scales the preset constants to a
call's step count, so the rule's window keeps its place in the run.

Everything here is pure (plain floats and ints) so the rule can be driven by synthetic rate curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from accel.settings import ResolvedSchedule

RATE_EPS = 1e-12


def slope(rates: Sequence[float], i: int, lookback: int) -> float | None:
    """``(r[i-L+1] - r[i]) / L`` as published (``None`` before step ``L``)."""
    if i < lookback or i >= len(rates):
        return None
    return (rates[i - lookback + 1] - rates[i]) / lookback


def find_tau1(rates: Sequence[float], lookback: int, eps: float, tau_cap: int) -> int | None:
    """The switch step from the rates measured so far (``r[0..n-1]``), or ``None`` while undecided."""
    for i in range(min(len(rates), tau_cap)):
        s = slope(rates, i, lookback)
        if s is not None and 0 <= s < eps:
            return i
    if len(rates) >= tau_cap:  # no step qualified by i = tau_cap - 1
        return tau_cap
    return None


def clamp_window(tau1: int, tau2: int, num_steps: int) -> tuple[int, int] | None:
    """The pipelined steps ``(tau1 + 1, min(tau2, last))``, or ``None`` when that is empty."""
    start, end = tau1 + 1, min(tau2, num_steps - 1)
    return (start, end) if start <= end else None


def taus(schedule: ResolvedSchedule, rates: Sequence[float]) -> tuple[int, int] | None:
    """``(tau1, tau2)`` as far as the rates measured so far decide them (``None``: not (yet) switching)."""
    if schedule.mode == "never":
        return None
    if schedule.mode == "window":
        assert schedule.window is not None
        start, end = schedule.window
        return start - 1, end
    if schedule.mode == "always":
        return schedule.lookback - 1, 2**31
    tau1 = find_tau1(rates, schedule.lookback, schedule.eps, schedule.tau_cap)
    return None if tau1 is None else (tau1, tau1 + schedule.k)


def earliest_start(schedule: ResolvedSchedule) -> int | None:
    """The earliest step a window can start at (``None``: never), whatever the rates."""
    if schedule.mode == "never":
        return None
    if schedule.mode == "window":
        assert schedule.window is not None
        return schedule.window[0]
    if schedule.mode == "always":
        return schedule.lookback
    return min(schedule.lookback, schedule.tau_cap) + 1


def window_steps(schedule: ResolvedSchedule, num_steps: int) -> int:
    """How many leading steps of a ``num_steps``-step run a window may cover: all of them for a fixed
    window or ``"always"`` (the user asked for those steps), all but the last for the adaptive rule."""
    return num_steps - 1 if schedule.mode == "adaptive" else num_steps


def window_for(schedule: ResolvedSchedule, rates: Sequence[float], num_steps: int) -> tuple[int, int] | None:
    """The window ``(first, last)`` pipelined step (inclusive) for a run of ``num_steps`` steps.

    ``rates`` holds ``r_i`` for the CFG steps (at least up to ``tau1``; extra entries are ignored).
    """
    found = taus(schedule, rates)
    return None if found is None else clamp_window(found[0], found[1], window_steps(schedule, num_steps))


def relative_gap(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """``mean|cond - uncond| / (mean|uncond| + 1e-12)`` as a 0-dim fp32 tensor on their device (no sync)."""
    u = uncond.float()
    return (cond.float() - u).abs().mean() / (u.abs().mean() + RATE_EPS)


class LaggedRates:
    """Rates kept on the device, copied to the host without blocking; read there one step later.

    ``push`` is called in the step that computes a rate; ``value(i)`` in a later step. On CUDA it waits for
    the event recorded after rate ``i``'s copy. The adaptive rule reads rate ``i - 1`` at the start of step
    ``i`` (the window may start at step ``i``), when the device may still be finishing step ``i - 1``: so
    while the rule is undecided and can fire (steps ``L + 1 .. tau_cap``, at most ``tau_cap - L`` steps:
    3 with the SDXL defaults, 5 with SD3's, at 50 steps) each step waits once for the previous step's
    prediction, and the host's lead over the device is lost there. No other step reads a rate. Deciding
    on rates two steps old would remove the wait, but start the window one step later than the rule.
    """

    def __init__(self) -> None:
        self._device: list[torch.Tensor] = []
        self._host: list[torch.Tensor] = []
        self._events: list[Any] = []
        self._values: list[float | None] = []

    def __len__(self) -> int:
        return len(self._device)

    def push(self, rate: torch.Tensor) -> None:
        self._device.append(rate)
        if rate.device.type == "cuda":
            host = torch.empty((), dtype=rate.dtype, pin_memory=True)
            host.copy_(rate, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._host.append(host)
            self._events.append(event)
        else:
            self._host.append(rate)
            self._events.append(None)
        self._values.append(None)

    def skip(self) -> None:
        """No rate for this step (a pipelined step): its entry reads as NaN."""
        self._device.append(torch.full((), float("nan")))
        self._host.append(self._device[-1])
        self._events.append(None)
        self._values.append(float("nan"))

    def value(self, i: int) -> float:
        cached = self._values[i]
        if cached is not None:  # NaN (a skipped step) included
            return cached
        event = self._events[i]
        if event is not None:
            event.synchronize()
        value = float(self._host[i])
        self._values[i] = value
        return value

    def values(self) -> list[float]:
        """Every rate as floats (after the call)."""
        return [self.value(i) for i in range(len(self._device))]
