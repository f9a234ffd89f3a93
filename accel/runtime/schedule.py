"""Adaptive parallelism switching: when the pipelined window starts and ends.

Per CFG step ``i`` the runtime measures the relative gap between the guidance branches,
``r_i = mean|eps_c - eps_u| / (mean|eps_u| + 1e-12)``, from the gathered prediction (identical on every
rank, so the decision needs no extra collective). The published rule (METHOD.md section 3):

- once ``i >= L``: ``slope_i = (r[i-L+1] - r[i]) / L``;
- ``tau1`` = the first ``i`` with ``0 <= slope_i < eps``; if none qualified by ``i = tau_cap - 1``,
  ``tau1 = tau_cap``;
- ``tau2 = tau1 + k``; the window is the steps ``tau1 + 1 .. tau2`` inclusive, clamped to the last step.

Everything here is pure (plain floats and ints) so the rule can be driven by synthetic rate curves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

ScheduleMode = Literal["adaptive", "window", "always", "never"]
SCHEDULE_MODES: tuple[str, ...] = ("adaptive", "window", "always", "never")
RATE_EPS = 1e-12


class ScheduleError(ValueError):
    """A schedule setting is invalid; the message names the field and the valid values."""


@dataclass(frozen=True)
class FamilyDefaults:
    """The published switch-rule constants of one denoiser family."""

    lookback: int
    eps: float
    k: int
    tau_cap: int


#: SDXL (U-Net) and SD3 (DiT) defaults: the published constants, except the DiT's latest switch step
#: (published: 40). SD3's flow-matching schedule takes its largest steps last, so a fallback window at
#: steps 41-45 deviated most of all window positions measured on the trained SD3-family model
#: (docs/quality.md); with 20 the fallback window is steps 21-25.
FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "unet": FamilyDefaults(lookback=12, eps=4e-4, k=5, tau_cap=15),
    "dit": FamilyDefaults(lookback=15, eps=5e-4, k=5, tau_cap=20),
}


def _positive_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ScheduleError(f"schedule {name} must be an integer >= {minimum}, got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class ScheduleSettings:
    """When the hybrid runtime pipelines (validated on construction).

    Attributes:
        mode: ``"adaptive"`` (the published slope rule), ``"window"`` (the fixed steps ``window``),
            ``"always"`` (pipeline every step after a warm-up of ``lookback`` CFG steps), ``"never"``
            (CFG split only; exact).
        window: ``(start, end)``, 0-based steps, inclusive, for ``mode="window"``; ``start >= 1``, since the
            window starts from activations of the CFG step before it. An end past the last step is clamped.
        lookback: ``L`` of the slope rule (``None``: the family default, 12 for U-Nets, 15 for DiTs).
        eps: slope threshold (``None``: 4e-4 for U-Nets, 5e-4 for DiTs).
        k: pipelined steps per window (``None``: 5).
        tau_cap: latest switch step (``None``: 15 for U-Nets, 20 for DiTs; published: 15 and 40).
    """

    mode: ScheduleMode = "adaptive"
    window: tuple[int, int] | None = None
    lookback: int | None = None
    eps: float | None = None
    k: int | None = None
    tau_cap: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULE_MODES:
            choices = ", ".join(repr(m) for m in SCHEDULE_MODES)
            raise ScheduleError(f"schedule mode {self.mode!r} is not supported; choose one of {choices}.")
        if self.mode == "window":
            window = self.window
            if (
                not isinstance(window, Sequence)
                or isinstance(window, str)
                or len(window) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in window)
            ):
                raise ScheduleError(
                    f"schedule window must be a (start, end) pair of integers, got {window!r}."
                )
            start, end = int(window[0]), int(window[1])
            if start < 1 or end < start:
                raise ScheduleError(
                    f"schedule window {tuple(window)!r} is invalid: need 1 <= start <= end (0-based steps, "
                    "inclusive; step 0 must be a CFG step, whose activations start the window)."
                )
            object.__setattr__(self, "window", (start, end))
        elif self.window is not None:
            raise ScheduleError(f"schedule window={self.window!r} needs mode='window', not {self.mode!r}.")
        if self.lookback is not None:
            _positive_int("lookback", self.lookback, 1)
        if self.k is not None:
            _positive_int("k", self.k, 1)
        if self.tau_cap is not None:
            _positive_int("tau_cap", self.tau_cap, 0)
        if self.eps is not None and (
            isinstance(self.eps, bool) or not isinstance(self.eps, int | float) or not self.eps > 0
        ):
            raise ScheduleError(f"schedule eps must be a number > 0, got {self.eps!r}.")

    @classmethod
    def parse(cls, value: Any) -> ScheduleSettings:
        """Accept ``None`` (adaptive), a mode name, a ``(start, end)`` window, a dict or a ScheduleSettings."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(mode=value)  # type: ignore[arg-type]
        if isinstance(value, Mapping):
            data = dict(value)
            if data.get("window") is not None:
                data["window"] = tuple(data["window"])
            try:
                return cls(**data)
            except TypeError as exc:
                raise ScheduleError(f"invalid schedule settings {value!r}: {exc}") from None
        if isinstance(value, Sequence):
            return cls(mode="window", window=tuple(value))  # type: ignore[arg-type]
        raise ScheduleError(
            f"schedule={value!r} is not understood: pass 'adaptive', 'always', 'never', a (start, end) "
            "window or ScheduleSettings(...)."
        )

    def resolve(self, family: str) -> ResolvedSchedule:
        """Fill the family defaults (``"unet"`` or ``"dit"``)."""
        defaults = FAMILY_DEFAULTS.get(family, FAMILY_DEFAULTS["unet"])
        return ResolvedSchedule(
            mode=self.mode,
            window=self.window,
            lookback=defaults.lookback if self.lookback is None else self.lookback,
            eps=defaults.eps if self.eps is None else float(self.eps),
            k=defaults.k if self.k is None else self.k,
            tau_cap=defaults.tau_cap if self.tau_cap is None else self.tau_cap,
        )


@dataclass(frozen=True)
class ResolvedSchedule:
    """A schedule with every constant filled in."""

    mode: str
    window: tuple[int, int] | None
    lookback: int
    eps: float
    k: int
    tau_cap: int


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


def window_for(schedule: ResolvedSchedule, rates: Sequence[float], num_steps: int) -> tuple[int, int] | None:
    """The window ``(first, last)`` pipelined step (inclusive) for a run of ``num_steps`` steps.

    ``rates`` holds ``r_i`` for the CFG steps (at least up to ``tau1``; extra entries are ignored).
    """
    found = taus(schedule, rates)
    return None if found is None else clamp_window(found[0], found[1], num_steps)


def relative_gap(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """``mean|cond - uncond| / (mean|uncond| + 1e-12)`` as a 0-dim fp32 tensor on their device (no sync)."""
    u = uncond.float()
    return (cond.float() - u).abs().mean() / (u.abs().mean() + RATE_EPS)


class LaggedRates:
    """Rates kept on the device; read on the host one step later through a non-blocking copy.

    ``push`` is called in the step that computes a rate; ``value(i)`` in a later step (on CUDA it waits only
    for the event recorded after rate ``i``'s copy, which the device has long passed by then).
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
