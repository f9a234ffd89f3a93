"""Figures of the quality suite (matplotlib, written as PNG files)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from accel.atomic import atomic_path
from accel.bench.quality import FamilyResult, ModeResult, QualityReport
from accel.runtime.schedule import slope
from accel.settings import FAMILY_DEFAULTS
from accel.testing.quality.models import ADAPTER_FAMILY

_COLOURS = {"reference": "tab:red", "cached": "tab:blue", "off": "tab:green"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: QualityReport, out_dir: str | Path) -> list[Path]:
    """Write every family's figures (see :func:`plot_family`) into ``out_dir``."""
    return [path for family in report.families for path in plot_family(family, Path(out_dir))]


def plot_family(family: FamilyResult, out_dir: Path) -> list[Path]:
    """Write the rate curve, the quality-vs-window figure and, when images were kept, a sample grid."""
    written = [_plot_rates(family, out_dir), _plot_quality(family, out_dir)]
    if family.images:
        written.append(_plot_samples(family, out_dir))
    return written


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)


def _rule_windows(family: FamilyResult) -> list[tuple[ModeResult, str, str]]:
    """The first result of each adaptive schedule (accel's defaults, the published constants): every
    guidance mode measures the same rates before the window, so all of them switch alike."""
    found = []
    for label, colour, what in (
        ("adaptive", "tab:purple", "accel default"),
        ("published", "tab:orange", "published"),
    ):
        first = next((m for m in family.modes if m.name.endswith("/" + label)), None)
        if first is not None:
            found.append((first, colour, what))
    return found


def _plot_rates(family: FamilyResult, out_dir: Path) -> Path:
    plt = _pyplot()
    defaults = FAMILY_DEFAULTS[ADAPTER_FAMILY[family.family]]
    rates = np.asarray(family.rates)
    steps = np.arange(len(rates))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[2, 1])
    if family.sample_rates:
        per_sample = np.asarray(family.sample_rates)
        low, high = np.percentile(per_sample, [10, 90], axis=0)
        top.fill_between(steps, low, high, color="0.85", label="10-90 % of samples")
    top.plot(steps, rates, color="k", lw=1.8, label="r_i of the batch (what the runtime measures)")
    for result, colour, what in _rule_windows(family):
        if result.tau1 is None:
            continue
        top.axvline(result.tau1, color=colour, ls="--", lw=1, label=f"{what}: tau1 = {result.tau1}")
        if result.window is not None:
            top.axvspan(
                result.window[0] - 0.5,
                result.window[1] + 0.5,
                color=colour,
                alpha=0.15,
                label=f"{what}: pipelined steps {result.window[0]}-{result.window[1]} (tau2 = {result.tau2})",
            )
    top.axvline(defaults.tau_cap, color="0.5", ls=":", lw=1, label=f"tau_cap = {defaults.tau_cap}")
    top.set_ylabel("r_i = mean|eps_c - eps_u| / mean|eps_u|")
    top.set_yscale("log")
    top.legend(fontsize=8, loc="upper right")
    top.set_title(f"{family.family}: branch gap per step (exact CFG, {len(family.sample_rates)} samples)")
    slopes = [slope(list(rates), i, defaults.lookback) for i in range(len(rates))]
    xs = [i for i, s in enumerate(slopes) if s is not None]
    bottom.plot(xs, [slopes[i] for i in xs], color="k", lw=1.2, label=f"slope_i (L = {defaults.lookback})")
    bottom.axhline(defaults.eps, color="tab:purple", ls="--", lw=1, label=f"eps = {defaults.eps:g}")
    bottom.axhline(0, color="0.5", lw=0.8)
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    bottom.set_xlabel("step i")
    bottom.set_ylabel("slope")
    bottom.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = out_dir / f"rates-{family.family}.png"
    _save(fig, path)
    return path


def _plot_quality(family: FamilyResult, out_dir: Path) -> Path:
    plt = _pyplot()
    exact = family.mode("exact")
    first = FAMILY_DEFAULTS[ADAPTER_FAMILY[family.family]].lookback + 1
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for guidance, colour in _COLOURS.items():
        hybrid = [m for m in family.modes if m.mode.window_guidance == guidance]
        fixed = [(m.mode.fixed_window, m) for m in hybrid if m.mode.fixed_window is not None]
        by_length = sorted((m for w, m in fixed if w[0] == first), key=lambda m: m.pipelined_steps)
        by_start = sorted(((w[0], m) for w, m in fixed if m.pipelined_steps == 5), key=lambda p: p[0])
        rules = [
            (m, "*" if m.name.endswith("/adaptive") else "X") for m in hybrid if m.mode.fixed_window is None
        ]
        for row, value in enumerate((_accuracy, _psnr)):
            length_ax, start_ax = axes[row]
            length_ax.plot(
                [m.pipelined_steps for m in by_length],
                [value(m) for m in by_length],
                "o-",
                color=colour,
                label=guidance,
            )
            start_ax.plot([w for w, _ in by_start], [value(m) for _, m in by_start], "o-", color=colour)
            for m, marker in rules:
                if m.window is not None:
                    length_ax.plot(m.pipelined_steps, value(m), marker, color=colour, ms=11)
                    start_ax.plot(m.window[0], value(m), marker, color=colour, ms=11)
    lowest = min(_accuracy(m) for m in family.modes)
    unguided = next((m for m in family.modes if m.name == "no-guidance"), None)
    for ax in axes[0]:
        ax.axhline(_accuracy(exact), color="k", ls="--", lw=1, label="exact CFG")
        if unguided is not None:
            ax.axhline(_accuracy(unguided), color="0.5", ls=":", lw=1, label="no guidance (every step)")
        ax.set_ylabel("conditional accuracy (%)")
        ax.set_ylim(min(lowest, _accuracy(exact)) - 5, 101)
    for ax in axes[1]:
        ax.set_ylabel("mean PSNR vs exact (dB)")
    for ax in axes[:, 0]:
        ax.set_xlabel(f"pipelined steps (windows starting at step {first})")
    for ax in axes[:, 1]:
        ax.set_xlabel("first pipelined step (5-step windows)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        f"{family.family}: quality vs window length and position (star: adaptive, X: published rule; "
        f"{len(exact.predicted)} samples, 50 steps)",
        fontsize=10,
    )
    fig.tight_layout()
    path = out_dir / f"quality-{family.family}.png"
    _save(fig, path)
    return path


def _accuracy(result: ModeResult) -> float:
    return 100.0 * result.accuracy


def _psnr(result: ModeResult) -> float:
    return result.psnr_mean_db if math.isfinite(result.psnr_mean_db) else float("nan")


def _plot_samples(family: FamilyResult, out_dir: Path, *, seed_rows: int = 2) -> Path:
    plt = _pyplot()
    names = [n for n in family.images if n in ("exact", "no-guidance", "cfg") or n.endswith("/adaptive")]
    longest: dict[str, ModeResult] = {}
    for result in family.modes:
        guidance = result.mode.window_guidance
        if guidance is not None and result.name in family.images:
            if guidance not in longest or result.pipelined_steps > longest[guidance].pipelined_steps:
                longest[guidance] = result
    names += [m.name for m in longest.values() if m.name not in names]
    seed_rows = max(1, min(seed_rows, len(family.images[names[0]]) // 10))
    fig, axes = plt.subplots(len(names), 1, figsize=(7, (0.3 + 0.75 * seed_rows) * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        ax.imshow(_grid(family.images[name][: 10 * seed_rows], seed_rows), cmap="gray", vmin=0, vmax=1)
        accuracy = 100.0 * family.mode(name).accuracy
        ax.set_title(f"{name}  (accuracy {accuracy:.0f} %)", fontsize=8, loc="left")
        ax.axis("off")
    fig.suptitle(f"{family.family}: digits 0-9 of seeds 0-{seed_rows - 1}", fontsize=9)
    fig.tight_layout()
    path = out_dir / f"samples-{family.family}.png"
    _save(fig, path)
    return path


def _grid(images: np.ndarray, rows: int, gap: int = 1) -> np.ndarray:
    """Grey images ``[rows * 10, H, W, 3]`` tiled 10 to a row, with a grey gap between them."""
    grey = images.mean(axis=-1)
    _, h, w = grey.shape
    out = np.full((rows * (h + gap) - gap, 10 * (w + gap) - gap), 0.5)
    for i, image in enumerate(grey):
        r, c = divmod(i, 10)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = image
    return out
