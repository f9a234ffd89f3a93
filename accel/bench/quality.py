"""The quality suite of ``accel bench``: how much each accelerated mode changes what a trained model generates.

For each trained digit pipeline (:mod:`accel.testing.quality`), every sample of a fixed set (all ten
digits for each seed) is generated once per mode, in one batched call:

- ``exact``: the unwrapped pipeline in this process (the reference);
- ``cfg``: ``strategy="cfg"`` on 2 gloo processes (exact up to fp rounding);
- ``<guidance>/<schedule>``: ``strategy="hybrid"`` on 2 gloo processes, with ``window_guidance`` one of
  ``reference``, ``cached``, ``off`` and the schedule ``adaptive`` (the rule with accel's defaults),
  ``published`` (the rule with the published constants, where they differ) or a fixed ``start-end``
  window.

Each mode is judged by the conditional accuracy (the share of samples the digit classifier reads as the
requested digit), the classifier's mean probability of the requested digit (``p(requested)``, which
moves before the accuracy does), its agreement with the exact run's classifications, and per sample
against the exact output: PSNR of the decoded images (``[0, 1]``) and mean absolute error of the final
latents. The branch gap ``r_i`` that drives the adaptive rule is recorded in the exact run (for the
whole batch, as the runtime measures it, and per sample), next to the windows the runtime chose.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch

from accel.accelerator import Accelerator
from accel.atomic import write_text_atomic
from accel.runtime.schedule import relative_gap
from accel.settings import FAMILY_DEFAULTS
from accel.testing.measure import psnr
from accel.testing.quality import (
    FAMILIES,
    Generated,
    QualityModel,
    SampleSet,
    classify,
    conditional_accuracy,
    generate,
    load_classifier,
    load_quality_model,
    requested_probability,
)
from accel.testing.quality.models import ADAPTER_FAMILY, classifier_record
from accel.wrapper import find_denoiser, unwrap

log = logging.getLogger(__name__)

WINDOW_GUIDANCE: tuple[str, ...] = ("reference", "cached", "off")
WINDOW_LENGTHS: tuple[int, ...] = (2, 5, 10, 20)
WINDOW_STARTS: tuple[int, ...] = (3, 8, 21, 24, 29, 40)
#: The published switch-rule constants (docs/concepts.md, section 3), compared with accel's defaults.
PUBLISHED_SCHEDULES: dict[str, dict[str, Any]] = {
    "sdxl": dict(lookback=12, eps=4e-4, k=5, tau_cap=15),
    "sd3": dict(lookback=15, eps=5e-4, k=5, tau_cap=40),
}
PSNR_CAP_DB = 100.0
"""Per-sample PSNR is capped here: identical images (infinite PSNR) and fp-rounding differences alike."""


@dataclass(frozen=True)
class QualityMode:
    """One way of running a pipeline.

    Attributes:
        name: unique within a family, e.g. ``"exact"``, ``"cfg"``, ``"cached/adaptive"``, ``"off/13-17"``,
            ``"reference/published"``.
        strategy: ``"exact"`` (unwrapped, one process), ``"cfg"`` or ``"hybrid"`` (2 processes).
        window_guidance: for ``"hybrid"`` (``None``: accel's default).
        schedule: for ``"hybrid"``: ``"adaptive"``, a ``(start, end)`` window or a ``ScheduleSettings``
            dict (``None``: accel's default).
        guidance_scale: overrides the model's guidance scale (``"no-guidance"``: 1.0, the floor that
            dropping guidance in every step would reach).
    """

    name: str
    strategy: str
    window_guidance: str | None = None
    schedule: str | tuple[int, int] | dict[str, Any] | None = None
    guidance_scale: float | None = None

    def call_kwargs(self, model_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The pipeline call arguments for this mode: the model's, with ``guidance_scale`` if set."""
        if self.guidance_scale is None:
            return dict(model_kwargs)
        return {**model_kwargs, "guidance_scale": self.guidance_scale}

    @property
    def fixed_window(self) -> tuple[int, int] | None:
        """The ``(start, end)`` of a fixed-window schedule (``None`` for any other)."""
        return self.schedule if isinstance(self.schedule, tuple) else None

    def wrap_settings(self) -> dict[str, Any]:
        """The per-pipeline settings ``accel.wrap`` gets for this mode (unset ones keep accel's defaults)."""
        settings: dict[str, Any] = dict(strategy=self.strategy)
        if self.window_guidance is not None:
            settings["window_guidance"] = self.window_guidance
        if self.schedule is not None:
            settings["schedule"] = self.schedule
        return settings


def fixed_windows(
    family: str, lengths: Sequence[int] = WINDOW_LENGTHS, starts: Sequence[int] = WINDOW_STARTS
) -> list[tuple[int, int]]:
    """Windows of each length in ``lengths`` starting where the adaptive rule can switch first
    (``L + 1``), then 5-step windows starting at each step of ``starts``."""
    first = FAMILY_DEFAULTS[ADAPTER_FAMILY[family]].lookback + 1
    return [(first, first + k - 1) for k in lengths] + [(s, s + 4) for s in starts if s != first]


def published_schedule(family: str) -> dict[str, Any] | None:
    """The published switch rule of ``family`` as a schedule, where accel's defaults differ from it."""
    published = PUBLISHED_SCHEDULES[family]
    if asdict(FAMILY_DEFAULTS[ADAPTER_FAMILY[family]]) == published:
        return None
    return dict(mode="adaptive", **published)


def default_modes(family: str, *, windows: Sequence[tuple[int, int]] | None = None) -> list[QualityMode]:
    """``exact``, ``no-guidance``, ``cfg`` and, for every window guidance mode, the adaptive schedule with accel's defaults
    (and with the published constants where those differ), then each fixed window."""
    schedules: list[tuple[str, Any]] = [("adaptive", "adaptive")]
    published = published_schedule(family)
    if published is not None:
        schedules.append(("published", published))
    schedules += [(f"{a}-{b}", (a, b)) for a, b in (windows or fixed_windows(family))]
    modes = [
        QualityMode("exact", "exact"),
        QualityMode("no-guidance", "exact", guidance_scale=1.0),
        QualityMode("cfg", "cfg"),
    ]
    for guidance in WINDOW_GUIDANCE:
        modes += [QualityMode(f"{guidance}/{label}", "hybrid", guidance, sched) for label, sched in schedules]
    return modes


@dataclass
class ModeResult:
    """One mode's numbers for one family (per-sample lists in batch order)."""

    mode: QualityMode
    accuracy: float
    confidence: float
    agreement: float
    psnr_mean_db: float
    psnr_min_db: float
    latent_mae: float
    latent_max_abs: float
    seconds: float
    window: tuple[int, int] | None = None
    tau1: int | None = None
    tau2: int | None = None
    pipelined_steps: int = 0
    predicted: list[int] = field(default_factory=list)
    psnr_db: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The mode's name."""
        return self.mode.name


@dataclass
class FamilyResult:
    """Every mode of one family, with the exact run's branch-gap curves."""

    family: str
    call_kwargs: dict[str, Any]
    rates: list[float]
    sample_rates: list[list[float]]
    modes: list[ModeResult]
    images: dict[str, np.ndarray] = field(default_factory=dict)

    def mode(self, name: str) -> ModeResult:
        """The result of the mode called ``name``."""
        for result in self.modes:
            if result.name == name:
                return result
        raise KeyError(f"no mode {name!r}; modes: {', '.join(r.name for r in self.modes)}")


@dataclass
class QualityReport:
    """The quality suite's results and the setting they were measured in."""

    steps: int
    seeds: list[int]
    classifier: dict[str, Any]
    families: list[FamilyResult]
    environment: dict[str, Any]

    def family(self, name: str) -> FamilyResult:
        """The results of one family."""
        for result in self.families:
            if result.family == name:
                return result
        raise KeyError(name)


# --------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------
class _GapRecorder:
    """A forward hook on the denoiser that keeps ``r_i`` per step: for the whole batch (what the runtime
    measures) and per sample."""

    def __init__(self) -> None:
        self.batch: list[float] = []
        self.per_sample: list[list[float]] = []

    def __call__(self, _module: torch.nn.Module, _args: Any, output: Any) -> None:
        prediction = output[0] if isinstance(output, tuple | list) else output.sample
        uncond, cond = prediction.detach().float().chunk(2)
        self.batch.append(float(relative_gap(uncond, cond)))
        diff = (cond - uncond).abs().flatten(1).mean(dim=1)
        self.per_sample.append((diff / (uncond.abs().flatten(1).mean(dim=1) + 1e-12)).tolist())


def _run_local(
    model: QualityModel, samples: SampleSet, call_kwargs: dict[str, Any], steps: int, *, gaps: bool
) -> tuple[Generated, float, _GapRecorder]:
    """One unwrapped call in this process; with ``gaps``, ``r_i`` is recorded (the call must use CFG)."""
    recorder = _GapRecorder()
    _, denoiser = find_denoiser(model.pipe)
    handle = denoiser.register_forward_hook(recorder) if gaps else None
    threads = torch.get_num_threads()
    # The same thread count as each of the 2 worker processes gets (half the cores): on a busy CPU more
    # threads than cores make the reference run crawl.
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    start = time.perf_counter()
    try:
        generated = generate(model.pipe, samples, call_kwargs, steps=steps)
    finally:
        if handle is not None:
            handle.remove()
        torch.set_num_threads(threads)
    return generated, time.perf_counter() - start, recorder


def _distributed_worker(
    acc: Any,
    jobs: list[tuple[str, list[QualityMode]]],
    seeds: list[int],
    steps: int,
    root: str | None,
    plan_dir: str,
) -> dict[str, dict[str, Any]]:
    """Runs on each of the 2 ranks: every 2-process mode of every family; rank 0's outputs come back."""
    samples = SampleSet(seeds=tuple(seeds))
    results: dict[str, dict[str, Any]] = {}
    for family, modes in jobs:
        model = load_quality_model(family, root=root)
        plan_file = os.path.join(plan_dir, f"{family}.plan.json")
        planned = False
        out: dict[str, Any] = {}
        for mode in modes:
            settings = mode.wrap_settings()
            if mode.strategy == "hybrid" and planned:
                # One profiled cut for every hybrid mode: modes differ only in what they are meant to.
                settings["plan"] = plan_file
            wrapped = acc.wrap(model.pipe, **settings)
            start = time.perf_counter()
            generated = generate(wrapped, samples, mode.call_kwargs(model.call_kwargs), steps=steps)
            seconds = time.perf_counter() - start
            report = wrapped.last_report
            plan = getattr(wrapped.runtime, "plan", None)
            if mode.strategy == "hybrid" and not planned and plan is not None:
                if acc.rank == 0:
                    plan.save(plan_file)
                acc.barrier()
                planned = True
            unwrap(wrapped)
            out[mode.name] = {"generated": generated, "seconds": seconds, "report": report}
            log.info("%s %s: %.1f s", family, mode.name, seconds)
        results[family] = out
    return results


def _score(
    mode: QualityMode,
    generated: Generated,
    exact: Generated,
    exact_predicted: list[int],
    labels: list[int],
    classifier: Any,
    seconds: float,
    report: Any = None,
) -> ModeResult:
    predicted = classify(classifier, generated.images)
    psnrs = [min(PSNR_CAP_DB, psnr(a, b)) for a, b in zip(generated.images, exact.images, strict=True)]
    diff = (generated.latents.double() - exact.latents.double()).abs()
    result = ModeResult(
        mode=mode,
        accuracy=conditional_accuracy(predicted, labels),
        confidence=float(np.mean(requested_probability(classifier, generated.images, labels))),
        agreement=conditional_accuracy(predicted, exact_predicted),
        psnr_mean_db=float(np.mean(psnrs)),
        psnr_min_db=float(np.min(psnrs)),
        latent_mae=float(diff.mean()),
        latent_max_abs=float(diff.max()),
        seconds=seconds,
        predicted=predicted,
        psnr_db=psnrs,
    )
    if report is not None and getattr(report, "strategy", "cfg") == "hybrid":
        result.window = report.window
        result.tau1, result.tau2 = report.tau1, report.tau2
        result.pipelined_steps = int(report.steps.get("pipeline", 0))
        result.rates = [float(r) for r in report.rates]
    return result


def run_quality(
    families: Sequence[str] = FAMILIES,
    *,
    seeds: Sequence[int] = tuple(range(10)),
    steps: int = 50,
    modes: Callable[[str], list[QualityMode]] = default_modes,
    root: str | Path | None = None,
    keep_images: bool = False,
) -> QualityReport:
    """Run every mode of every family on the same samples and score them against the exact run.

    Args:
        families: quality model families (``"sdxl"``, ``"sd3"``).
        seeds: sample seeds; each seed generates all ten digits.
        steps: denoising steps per call.
        modes: the modes to run per family (must include ``"exact"``, the unwrapped run at the model's
            guidance scale).
        root: where the trained models and the classifier are (default: the package's committed ones).
        keep_images: keep every mode's decoded images in :attr:`FamilyResult.images`.
    """
    samples = SampleSet(seeds=tuple(seeds))
    classifier = load_classifier(root)
    plans = {family: modes(family) for family in families}
    for family, listed in plans.items():
        if not any(m.name == "exact" and m.strategy == "exact" and m.guidance_scale is None for m in listed):
            raise ValueError(f"the modes of {family} need an 'exact' mode to compare against.")
    models: dict[str, QualityModel] = {}
    runs: dict[str, dict[str, tuple[Generated, float, Any]]] = {}
    recorders: dict[str, _GapRecorder] = {}
    for family in families:
        model = models[family] = load_quality_model(family, root=root)
        runs[family] = {}
        for mode in (m for m in plans[family] if m.strategy == "exact"):
            is_reference = mode.name == "exact"
            generated, seconds, recorder = _run_local(
                model, samples, mode.call_kwargs(model.call_kwargs), steps, gaps=is_reference
            )
            runs[family][mode.name] = (generated, seconds, None)
            if is_reference:
                recorders[family] = recorder
            log.info("%s %s: %.1f s", family, mode.name, seconds)
    jobs = [(f, [m for m in plans[f] if m.strategy != "exact"]) for f in families]
    if any(listed for _, listed in jobs):
        launcher = Accelerator(devices=2, accelerator="cpu", strategy="cfg")
        with tempfile.TemporaryDirectory(prefix="accel-quality-") as plan_dir:
            distributed = launcher.launch(
                _distributed_worker, jobs, list(seeds), steps, str(root) if root else None, plan_dir
            )
        for family, out in distributed.items():
            for name, run in out.items():
                runs[family][name] = (run["generated"], run["seconds"], run["report"])
    results: list[FamilyResult] = []
    labels = samples.labels
    for family in families:
        exact = runs[family]["exact"][0]
        exact_predicted = classify(classifier, exact.images)
        scored: list[ModeResult] = []
        images: dict[str, np.ndarray] = {}
        for mode in plans[family]:
            generated, seconds, report = runs[family][mode.name]
            scored.append(
                _score(mode, generated, exact, exact_predicted, labels, classifier, seconds, report)
            )
            if keep_images:
                images[mode.name] = generated.images
        recorder = recorders[family]
        per_sample = [list(row) for row in zip(*recorder.per_sample, strict=True)]
        results.append(
            FamilyResult(
                family=family,
                call_kwargs=dict(models[family].call_kwargs),
                rates=recorder.batch,
                sample_rates=per_sample,
                modes=scored,
                images=images,
            )
        )
    return QualityReport(
        steps=steps,
        seeds=list(seeds),
        classifier=classifier_record(root),
        families=results,
        environment=_environment(),
    )


def _environment() -> dict[str, Any]:
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (gloo, 2 processes)",
    }


# --------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------
def report_dict(report: QualityReport) -> dict[str, Any]:
    """The report as JSON-ready data (per-sample PSNR and predictions included, images left out)."""

    def mode_dict(result: ModeResult) -> dict[str, Any]:
        data = asdict(result)
        data["mode"] = asdict(result.mode)
        data["name"] = result.name
        return data

    return {
        "steps": report.steps,
        "seeds": report.seeds,
        "samples_per_mode": 10 * len(report.seeds),
        "classifier": report.classifier,
        "environment": report.environment,
        "families": [
            {
                "family": f.family,
                "call_kwargs": f.call_kwargs,
                "schedule_defaults": asdict(FAMILY_DEFAULTS[ADAPTER_FAMILY[f.family]]),
                "rates": f.rates,
                "sample_rate_percentiles": _percentiles(f.sample_rates),
                "modes": [mode_dict(m) for m in f.modes],
            }
            for f in report.families
        ],
    }


def _percentiles(per_sample: list[list[float]]) -> dict[str, list[float]]:
    """10th, 50th and 90th percentile over samples, per step."""
    if not per_sample:
        return {}
    values = np.percentile(np.asarray(per_sample), [10, 50, 90], axis=0)
    return {name: [float(v) for v in row] for name, row in zip(("p10", "p50", "p90"), values, strict=True)}


def _json_text(data: Any) -> str:
    """Indented JSON with every list of plain values on one line (per-sample lists stay short)."""
    text = json.dumps(data, indent=1)
    flat = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    return flat + "\n"


def _rounded(data: Any) -> Any:
    """``data`` with every float kept to 5 significant digits (a readable, diffable JSON file)."""
    if isinstance(data, float):
        return float(f"{data:.5g}") if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _rounded(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_rounded(v) for v in data]
    return data


def _window_text(result: ModeResult) -> str:
    if result.mode.strategy != "hybrid":
        return ""
    if result.window is None:
        return "none"
    return f"{result.window[0]}-{result.window[1]}"


def markdown_table(family: FamilyResult) -> str:
    """One markdown table row per mode of ``family``."""
    lines = [
        "| mode | window (steps) | pipelined | accuracy | p(requested) | agrees with exact "
        "| PSNR mean / min (dB) | latent MAE | CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in family.modes:
        lines.append(
            f"| {r.name} | {_window_text(r)} | {r.pipelined_steps} | {100 * r.accuracy:.0f} % "
            f"| {r.confidence:.4f} | {100 * r.agreement:.0f} % | {r.psnr_mean_db:.1f} / {r.psnr_min_db:.1f} "
            f"| {r.latent_mae:.4f} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def markdown_report(report: QualityReport) -> str:
    """The whole report as a markdown page."""
    env = report.environment
    parts = [
        "# Quality suite results",
        "",
        f"`accel bench --quality`, {env['date']}, torch {env['torch']}, diffusers {env['diffusers']}, "
        f"{env['machine']}. {report.steps} steps, seeds {report.seeds[0]}-{report.seeds[-1]} x 10 digits "
        f"= {10 * len(report.seeds)} samples per mode, all in one batched call. Digit classifier "
        f"held-out accuracy: {100 * float(report.classifier.get('heldout_accuracy', float('nan'))):.1f} %.",
        "",
        f"PSNR is per sample on the decoded 8x8 images against the exact run, capped at {PSNR_CAP_DB:.0f} dB; "
        "latent MAE is the mean absolute difference of the final latents. CPU seconds are wall time of "
        "the call on a shared CPU, not a speed measurement.",
    ]
    for family in report.families:
        defaults = FAMILY_DEFAULTS[ADAPTER_FAMILY[family.family]]
        published = PUBLISHED_SCHEDULES[family.family]
        parts += [
            "",
            f"## {family.family}",
            "",
            f"Guidance {family.call_kwargs['guidance_scale']}. `adaptive`: accel's rule L={defaults.lookback}, "
            f"eps={defaults.eps:g}, k={defaults.k}, tau_cap={defaults.tau_cap}"
            + (
                f"; `published`: tau_cap={published['tau_cap']}."
                if published_schedule(family.family) is not None
                else " (the published constants)."
            ),
            "",
            markdown_table(family),
        ]
    return "\n".join(parts) + "\n"


def write_report(report: QualityReport, out_dir: str | Path) -> list[Path]:
    """Write ``quality.json`` and ``quality.md`` into ``out_dir`` (the figures: :mod:`accel.bench.plots`)."""
    out = Path(out_dir)
    return [
        write_text_atomic(out / "quality.json", _json_text(_rounded(report_dict(report)))),
        write_text_atomic(out / "quality.md", markdown_report(report)),
    ]
