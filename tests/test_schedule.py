"""The switch rule, driven by synthetic rate curves."""

from __future__ import annotations

import math

import pytest
import torch

from accel.runtime.schedule import (
    LaggedRates,
    clamp_window,
    earliest_start,
    find_tau1,
    relative_gap,
    slope,
    taus,
    window_for,
)
from accel.settings import AccelSettings, ScheduleError, ScheduleSettings, SettingsError

SDXL = ScheduleSettings().resolve("unet")  # L=12, eps=4e-4, k=5, tau_cap=15
SD3 = ScheduleSettings().resolve("dit")  # L=15, eps=5e-4, k=5, tau_cap=20 (published: 40)


def _plateau_at(n: int, flat_from: int, *, high: float = 1.0, drop: float = 0.05) -> list[float]:
    """Falls by ``drop`` per step until ``flat_from``, then stays flat."""
    return [high - drop * min(i, flat_from) for i in range(n)]


def test_family_defaults() -> None:
    assert (SDXL.lookback, SDXL.eps, SDXL.k, SDXL.tau_cap) == (12, 4e-4, 5, 15)
    assert (SD3.lookback, SD3.eps, SD3.k, SD3.tau_cap) == (15, 5e-4, 5, 20)
    custom = ScheduleSettings(lookback=3, eps=1e-2, k=2, tau_cap=6).resolve("unet")
    assert (custom.lookback, custom.eps, custom.k, custom.tau_cap) == (3, 1e-2, 2, 6)


def test_slope_is_the_published_formula() -> None:
    rates = [1.0, 0.9, 0.7, 0.6, 0.55]
    assert slope(rates, 2, 3) is None  # before i = L
    assert slope(rates, 3, 3) == pytest.approx((0.9 - 0.6) / 3)  # r[i-L+1] - r[i], over L
    assert slope(rates, 4, 3) == pytest.approx((0.7 - 0.55) / 3)


def test_slope_path_switches_at_the_first_flat_step() -> None:
    # L=3, eps=0.01: the curve falls 0.05/step until step 6, flat after; slope_i = (r[i-2]-r[i])/3.
    rates = _plateau_at(20, 6)
    settings = ScheduleSettings(lookback=3, eps=0.01, k=4, tau_cap=15).resolve("unet")
    # slope_7 = (r5 - r7)/3 = 0.05/3 > eps; slope_8 = (r6 - r8)/3 = 0 -> tau1 = 8.
    assert find_tau1(rates, 3, 0.01, 15) == 8
    assert taus(settings, rates) == (8, 12)
    assert window_for(settings, rates, 20) == (9, 12)
    # Only the rates up to tau1 are needed: the decision is the same with r[0..8].
    assert find_tau1(rates[:9], 3, 0.01, 15) == 8
    assert find_tau1(rates[:8], 3, 0.01, 15) is None


def test_a_rising_rate_does_not_qualify() -> None:
    rates = [1.0, 0.5, 0.5, 0.6, 0.7, 0.8, 0.9]  # negative slopes after step 3
    assert find_tau1(rates, 2, 0.5, 10) == 2  # slope_2 = (r1 - r2)/2 = 0 qualifies
    assert find_tau1(rates[:2] + [0.6, 0.7, 0.8], 2, 0.5, 10) is None


def test_fallback_path_switches_at_tau_cap() -> None:
    rates = [1.0 - 0.1 * i for i in range(30)]  # keeps falling fast: slope 0.05 >= eps
    settings = ScheduleSettings(lookback=2, eps=0.01, k=3, tau_cap=6).resolve("unet")
    assert find_tau1(rates[:5], 2, 0.01, 6) is None  # undecided before r[tau_cap - 1]
    assert find_tau1(rates[:6], 2, 0.01, 6) == 6
    assert window_for(settings, rates, 30) == (7, 9)
    # Published SDXL defaults on a steadily falling curve: tau1 = 15, window 16..20.
    assert window_for(SDXL, [1.0 - 0.01 * i for i in range(50)], 50) == (16, 20)
    # SD3 defaults: L=15, fallback at tau_cap = 20, window 21..25 (published tau_cap 40: 41..45).
    assert window_for(SD3, [1.0 - 0.01 * i for i in range(50)], 50) == (21, 25)


def test_sdxl_defaults_on_a_plateau() -> None:
    rates = _plateau_at(50, 10, drop=0.03)
    # slope_i = (r[i-11] - r[i]) / 12 is 0 from i = 21 on; eps = 4e-4 needs it below 4e-4 ... first at 21.
    assert find_tau1(rates, 12, 4e-4, 15) == 15  # 21 > tau_cap: fallback
    flat = [0.5] * 50
    assert window_for(SDXL, flat, 50) == (13, 17)  # flat from the start: first i >= L is 12


def test_window_past_the_end_is_clamped_or_empty() -> None:
    settings = ScheduleSettings(lookback=2, eps=0.5, k=5, tau_cap=10).resolve("unet")
    flat = [0.3] * 8
    assert window_for(settings, flat, 5) == (3, 4)  # tau1 = 2, tau2 = 7 -> clamped to the last step 4
    assert window_for(settings, flat, 3) is None  # tau1 = 2 is the last step: nothing left to pipeline
    assert clamp_window(4, 9, 5) is None
    fixed = ScheduleSettings(mode="window", window=(3, 100)).resolve("unet")
    assert window_for(fixed, [], 8) == (3, 7)
    assert window_for(ScheduleSettings(mode="window", window=(9, 12)).resolve("unet"), [], 8) is None


def test_lookback_larger_than_the_step_count() -> None:
    # SD3 defaults on a 10-step run: L = 15 never reached, tau_cap = 20 never reached: no window.
    rates = [0.5] * 10
    assert find_tau1(rates, 15, 5e-4, 40) is None
    assert window_for(SD3, rates, 10) is None
    always = ScheduleSettings(mode="always", lookback=15).resolve("dit")
    assert window_for(always, rates, 10) is None
    assert window_for(ScheduleSettings(mode="always", lookback=3).resolve("dit"), [], 10) == (3, 9)


def test_earliest_start() -> None:
    assert earliest_start(SDXL) == 13 and earliest_start(SD3) == 16
    assert earliest_start(ScheduleSettings(tau_cap=4).resolve("unet")) == 5
    assert earliest_start(ScheduleSettings(mode="never").resolve("unet")) is None
    assert earliest_start(ScheduleSettings(mode="window", window=(3, 5)).resolve("unet")) == 3
    assert earliest_start(ScheduleSettings(mode="always", lookback=4).resolve("unet")) == 4


def test_fixed_never_and_always() -> None:
    assert window_for(ScheduleSettings(mode="never").resolve("unet"), [0.0] * 50, 50) is None
    assert window_for(ScheduleSettings(mode="window", window=(3, 5)).resolve("unet"), [], 8) == (3, 5)
    assert window_for(ScheduleSettings(mode="always").resolve("unet"), [], 50) == (12, 49)


def test_settings_are_validated_up_front() -> None:
    assert ScheduleSettings.parse(None) == ScheduleSettings()
    assert ScheduleSettings.parse("never").mode == "never"
    assert ScheduleSettings.parse((3, 5)) == ScheduleSettings(mode="window", window=(3, 5))
    assert ScheduleSettings.parse({"mode": "window", "window": [3, 5]}).window == (3, 5)
    for bad in ("sometimes", (0, 3), (5, 3), (1, 2, 3), 3.5, {"mode": "adaptive", "L": 3}):
        with pytest.raises(ScheduleError):
            ScheduleSettings.parse(bad)
    for kwargs in (dict(lookback=0), dict(eps=0.0), dict(k=0), dict(tau_cap=-1), dict(window=(1, 2))):
        with pytest.raises(ScheduleError):
            ScheduleSettings(**kwargs)  # type: ignore[arg-type]
    settings = AccelSettings(strategy="hybrid", devices=2, schedule=(3, 5), window_guidance="reference")
    assert settings.schedule == ScheduleSettings(mode="window", window=(3, 5))
    # Settings travel between processes as dicts: the schedule comes back typed.
    import dataclasses

    again = AccelSettings(**dataclasses.asdict(settings))
    assert again == settings
    with pytest.raises(SettingsError, match="window_guidance"):
        AccelSettings(strategy="hybrid", devices=2, window_guidance="maybe")  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="schedule"):
        AccelSettings(strategy="hybrid", devices=2, schedule="sometimes")
    with pytest.raises(SettingsError, match="is odd"):
        AccelSettings(strategy="hybrid", devices=3)
    AccelSettings(strategy="hybrid", devices=4)  # both strategies take any even count
    AccelSettings(strategy="cfg", devices=4)


def test_relative_gap_and_lagged_rates() -> None:
    u = torch.tensor([1.0, -1.0, 2.0, -2.0])
    c = torch.tensor([1.5, -1.0, 2.0, -2.5])
    rate = relative_gap(u, c)
    assert rate.dim() == 0 and rate.dtype == torch.float32
    assert rate.item() == pytest.approx((0.5 + 0.5) / 4 / 1.5)
    lagged = LaggedRates()
    lagged.push(rate)
    lagged.skip()
    values = lagged.values()
    assert values[0] == pytest.approx(rate.item()) and math.isnan(values[1])
