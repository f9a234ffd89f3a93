"""Markdown tables and a latency plot from speed-suite results (:mod:`accel.bench.speed` JSON files)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accel.atomic import atomic_path, write_text_atomic
from accel.bench.host import CONTENDED_CORES
from accel.compile.work import CompilerWork

DESCRIPTIONS: dict[str, str] = {
    "A": "diffusers eager, 1 GPU",
    "B": "diffusers + torch.compile (reduce-overhead), 1 GPU",
    "B*": "diffusers + the recipe by hand (fused qkv, channels-last, inductor tuning) + torch.compile "
    "({mode}), 1 GPU",
    "S": "accel, {backend}, 1 GPU",
    "C": "accel CFG split, eager, 2 GPUs",
    "D": "accel CFG split, {backend}, 2 GPUs",
    "E": "accel hybrid, {backend}, window guidance {mode}, 2 GPUs",
}


def describe(name: str, expert_mode: str = "max-autotune") -> str:
    """A configuration name (``A``, ``D-inductor``, ``E-inductor-cached``) in words; ``expert_mode`` is
    B*'s compile mode (results written before it was recorded used max-autotune)."""
    parts = name.split("-")
    template = DESCRIPTIONS.get(parts[0], name)
    backend = parts[1] if len(parts) > 1 else ""
    mode = expert_mode if parts[0] == "B*" else parts[2] if len(parts) > 2 else ""
    return template.format(backend=backend, mode=mode)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    if isinstance(value, list | tuple):
        return " / ".join(_fmt(v, 1) for v in value)
    return str(value)


def title(result: dict[str, Any]) -> str:
    """``SDXL 1024x1024`` and so on."""
    return f"{result['model'].upper()} {result['height']}x{result['width']}"


def markdown(result: dict[str, Any]) -> str:
    """One result as a markdown section: the environment line and the table of configurations."""
    env = result.get("environment", {})
    versions = result.get("versions", {})
    lines = [
        f"### {title(result)}, {result['steps']} steps, guidance {result['guidance']}, batch 1, {result['dtype']}",
        "",
        f"{env.get('gpus', 0)} x {env.get('gpu', 'CPU')} (driver {env.get('driver', '-')}, CUDA "
        f"{env.get('cuda', '-')}), torch {versions.get('torch')}, diffusers {versions.get('diffusers')}, "
        f"accel {versions.get('accel')}, {result['date']}; median of {result['repeat']} runs; "
        f"schedule {result.get('schedule')}; engines {_engines(result.get('engines'))}.",
        "",
        "| config | what | loop s | end-to-end s | loop vs A | loop vs B | loop vs B* | e2e vs A | e2e vs B "
        "| e2e vs B* | first call s | peak GiB per GPU | window | latent mean abs err | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tuned = _tuning(result.get("engine_tuning"))
    if tuned:
        lines[4:4] = [f"Engines' tuning: {tuned}.", ""]  # after the environment line, before the table
    if result.get("complete") is False:
        requested = ", ".join(result.get("configs_requested", []))
        of = f" of {requested} requested" if requested else " only"
        lines[2:2] = [f"The run was cut short: measured {', '.join(result['configs'])}{of}.", ""]
    ratios = result.get("ratios", {})
    for name, entry in result["configs"].items():
        r = ratios.get(name, {})
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    describe(name, result.get("expert_mode", "max-autotune")),
                    _fmt(entry["loop_median_s"]),
                    _fmt(entry["e2e_median_s"]),
                    _fmt(r.get("loop_vs_A"), 2),
                    _fmt(r.get("loop_vs_B"), 2),
                    _fmt(r.get("loop_vs_B*"), 2),
                    _fmt(r.get("e2e_vs_A"), 2),
                    _fmt(r.get("e2e_vs_B"), 2),
                    _fmt(r.get("e2e_vs_B*"), 2),
                    _fmt(entry.get("first_call_s"), 1),
                    _fmt(entry.get("peak_mem_gib")),
                    _fmt(entry.get("window")),
                    _fmt(entry.get("latent_mean_abs_err"), 4),
                    _fmt(entry.get("image_psnr_db"), 1),
                ]
            )
            + " |"
        )
    contended = {
        name: entry["other_cpu_cores"]
        for name, entry in result["configs"].items()
        if (entry.get("other_cpu_cores") or 0.0) >= CONTENDED_CORES
    }
    if contended:
        busy = ", ".join(f"{name} ({cores:.1f})" for name, cores in contended.items())
        lines += [
            "",
            f"Timed while other processes kept CPU cores busy: {busy}. A launch-bound loop (eager above all) "
            "runs slower on a contended host; those rows are not comparable and want a run on a quiet one.",
        ]
    worked = {
        name: entry["warmup_compiler_work"]
        for name, entry in result["configs"].items()
        if any((entry.get("warmup_compiler_work") or {}).values())
    }
    if worked:
        said = "; ".join(f"{name}: {CompilerWork(**w).describe()}" for name, w in worked.items())
        lines += ["", f"Compiler work in the warm-up calls (what the first call s column paid for): {said}."]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """One PNG: denoising-loop latency per configuration, one panel per model and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        names = list(result["configs"])
        loop = [result["configs"][n]["loop_median_s"] for n in names]
        e2e = [result["configs"][n]["e2e_median_s"] for n in names]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], loop, width=0.4, label="denoising loop")
        ax.bar([x + 0.2 for x in xs], e2e, width=0.4, label="end to end")
        ax.set_xticks(list(xs), names, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("seconds (median)")
        ax.set_title(title(result))
        ax.legend(fontsize=8)
    env = results[0].get("environment", {})
    fig.suptitle(f"accel bench on {env.get('gpus', 0)} x {env.get('gpu', 'CPU')} ({results[0]['date']})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_report(result_files: Sequence[Path], markdown_path: Path, plot_path: Path | None) -> None:
    """Regenerate the markdown tables (and the plot) from committed JSON results."""
    results = [json.loads(Path(f).read_text()) for f in result_files]
    body = ["# accel bench: speed suite", "", "Generated by `accel bench --report` from:", ""]
    body += [f"- `{Path(f).name}`" for f in result_files]
    body.append("")
    if plot_path is not None:
        plot(results, plot_path)
        body += [f"![latency per configuration]({plot_path.name})", ""]
    body += [markdown(r) for r in results]
    write_text_atomic(markdown_path, "\n".join(body))


def _engines(engines: str | dict[str, str | None] | None) -> str:
    """The engine directories of a run: per backend (results since S ran per backend), or the one
    directory of the first backend (earlier results)."""
    if isinstance(engines, dict):
        given = [f"{directory} ({backend})" for backend, directory in engines.items() if directory]
        return ", ".join(given) or "compiled in memory"
    return engines or "compiled in memory"


def _tuning(tuning: dict[str, Any] | None) -> str:
    """The engines' tuning, per backend (``{backend: {key: how}}``) or for one directory (``{key: how}``)."""
    if not tuning:
        return ""
    nested = all(isinstance(v, dict) or v is None for v in tuning.values())
    groups = tuning.items() if nested else [(None, tuning)]
    return "; ".join(
        f"{backend + ' ' if backend else ''}`{key}` {how}"
        for backend, per_key in groups
        for key, how in (per_key or {}).items()
    )
