"""Start-up: time from process start to the first image written, per backend, split into its parts.

Each mode runs ``accel run TARGET --json`` as a fresh process, as a user would, and is timed from just
before the process starts to the moment its first image is on disk. The worker's own milestones
(:func:`accel.cli.generate.generate`'s ``startup`` stamps) and the first call's report split that time:

- ``cli``: interpreter start and the command line's own imports, to the ``run`` command entered;
- ``prepare``: importing torch and diffusers, reading the target, the checks made before launching (with
  ``--engines`` and a plan: the engine directory against the model's denoiser graph);
- ``launch``: the launcher and the worker joining its group (in the same process with one device);
- ``load``: loading the diffusers pipeline;
- ``wrap``: wrapping it (settings, process-group checks);
- ``stages``: loading the engine files, or compiling the stages, during the first call;
- ``first_call``: the rest of the first pipeline call (the denoising loop and the VAE decode);
- ``save``: writing the image.

Modes: ``eager``; ``inductor-cold`` (torch.compile with an empty inductor cache, no engines);
``inductor`` and ``aot`` (engine files from ``accel export``, loaded with an empty inductor cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accel.atomic import atomic_path, write_text_atomic

MODES: tuple[str, ...] = ("eager", "inductor-cold", "inductor", "aot")
PARTS: tuple[str, ...] = ("cli", "prepare", "launch", "load", "wrap", "stages", "first_call", "save")


@dataclass(frozen=True)
class StartupCase:
    """What every mode runs: ``accel run TARGET`` with these arguments, engines from ``plan``."""

    target: str
    plan: str | None
    steps: int = 50
    height: int | None = None
    width: int | None = None
    devices: int = 1
    precision: str | None = "fp16"
    prompt: str = "a photo of an astronaut riding a horse"
    #: Pipeline calls per run (one image each); the calls after the first give the warm time per step.
    calls: int = 2

    def run_args(self) -> list[str]:
        """The ``accel run`` arguments every mode shares."""
        args = [self.target, "--devices", str(self.devices), "--steps", str(self.steps), "--batch-size", "1"]
        for _ in range(self.calls):
            args += ["-p", self.prompt]
        args.append("--verbose")  # the workers' load and compile steps, in the log next to the results
        if self.height is not None:
            args += ["--height", str(self.height)]
        if self.width is not None:
            args += ["--width", str(self.width)]
        if self.precision is not None:
            args += ["--precision", self.precision]
        return args


def _accel(*args: str) -> list[str]:
    return [sys.executable, "-m", "accel", *args]


def _timed(cmd: Sequence[str], env: dict[str, str], log: Path) -> tuple[float, float, int, str]:
    """Run ``cmd``; ``(start, end)`` wall-clock times, its exit code and its stdout (stderr goes to ``log``)."""
    with log.open("ab") as err:
        start = time.time()
        proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=err, env=env, check=False)
        end = time.time()
    return start, end, proc.returncode, proc.stdout.decode(errors="replace")


def export(
    case: StartupCase, backends: Sequence[str], work: Path, env: dict[str, str], log: Path
) -> list[dict[str, Any]]:
    """``accel export`` the case's plan once per backend into ``work/engines-<backend>``, the exports side
    by side (each compiles on the CPU for minutes); each one's wall time and exit code. A directory that
    already holds a manifest is used as it is (``"reused"``): ``accel run`` checks it before use."""
    from accel.compile.store import MANIFEST  # deferred: it imports torch; `accel --help` imports this

    reused = [b for b in backends if (work / f"engines-{b}" / MANIFEST).is_file()]
    backends = [b for b in backends if b not in reused]
    done: list[dict[str, Any]] = [{"backend": b, "reused": True} for b in reused]
    if not backends:
        return done
    if case.plan is None:
        raise ValueError("engine modes need a plan (accel plan TARGET --devices N -o PLAN).")
    plan = case.plan
    with log.open("ab") as err:
        start = time.time()
        procs = {
            backend: subprocess.Popen(
                _accel("export", plan, "--backend", backend, "-o", str(work / f"engines-{backend}")),
                stdout=err,
                stderr=err,
                env=env,
            )
            for backend in backends
        }
        for backend, proc in procs.items():
            code = proc.wait()
            done.append({"backend": backend, "seconds": time.time() - start, "returncode": code})
    return done


def measure(case: StartupCase, mode: str, work: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """One fresh ``accel run`` in ``mode``: total seconds to the first image, its parts, and stage counts."""
    if mode not in MODES:
        raise ValueError(f"unknown start-up mode {mode!r}; choose from {', '.join(MODES)}.")
    image = work / f"{mode}.png"
    args = case.run_args()
    if mode != "eager":
        backend = mode.split("-")[0]
        args += ["--backend", backend]
        if mode != "inductor-cold":
            args += ["--engines", str(work / f"engines-{backend}")]
    # Empty inductor and accel caches per run: only engine files may help a warm mode, and each run starts
    # as the first on a machine (the aot loader check included).
    run_env = {
        **env,
        "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix=f"inductor-{mode}-", dir=work),
        "ACCEL_CACHE_DIR": tempfile.mkdtemp(prefix=f"accel-cache-{mode}-", dir=work),
    }
    start, end, code, out = _timed(_accel("run", *args, "-o", str(image), "--json"), run_env, log)
    entry: dict[str, Any] = {"mode": mode, "returncode": code, "process_s": end - start}
    try:
        summary = json.loads(out[out.index("{") :])
    except ValueError:
        return {**entry, "error": "no JSON summary (see the log)"}
    if not summary.get("ok"):
        return {**entry, "error": summary.get("error")}
    stamps = summary.get("startup", {})
    call, warm = summary["calls"][0], summary["calls"][1:]
    stages = float(call.get("stage_seconds", 0.0))
    entered = stamps.get("cli", start)
    prepared = stamps.get("prepared", entered)
    parts = {
        "cli": entered - start,
        "prepare": prepared - entered,
        "launch": stamps["worker"] - prepared,
        "load": stamps["loaded"] - stamps["worker"],
        "wrap": stamps["wrapped"] - stamps["loaded"],
        "stages": stages,
        "first_call": stamps["first_call"] - stamps["wrapped"] - stages,
        "save": stamps["first_saved"] - stamps["first_call"],
    }
    return {
        **entry,
        "total_s": stamps["first_saved"] - start,
        "parts_s": parts,
        "first_call_ms_per_step": 1000 * (call["seconds"] - stages) / max(1, summary["steps"]),
        # A whole warm call (text encoding, the steps, the VAE decode) over the steps: the best of them.
        "warm_call_ms_per_step": (
            1000 * min(c["seconds"] for c in warm) / max(1, summary["steps"]) if warm else None
        ),
        "compiled_stages": call.get("compiled_stages", 0),
        "loaded_stages": call.get("loaded_stages", 0),
        "eager_stages": call.get("eager_stages", 0),
        "stage_first_call_s": call.get("stage_first_call_seconds"),
        "compiler_work": call.get("compiler_work"),
    }


def suite(
    case: StartupCase,
    modes: Sequence[str],
    work: Path,
    log: Path,
    on_progress: Callable[[dict[str, Any]], object] | None = None,
    *,
    repeat: int = 1,
) -> dict[str, Any]:
    """Export the engines the modes need, then time every mode ``repeat`` times, in order, each time in a
    fresh process (start-up varies by seconds from one process to the next: imports, CUDA set-up).

    ``on_progress(result)`` is called after the exports and after each run with the result so far.
    """
    from accel.bench.speed import environment, versions

    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    result: dict[str, Any] = {
        "case": case.__dict__,
        "environment": environment(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
        "exports": export(case, [b for b in ("inductor", "aot") if b in modes], work, env, log),
        "runs": [],
    }
    for mode in modes:
        for attempt in range(repeat):
            if on_progress is not None:
                on_progress(result)
            result["runs"].append({**measure(case, mode, work, env, log), "attempt": attempt})
    if on_progress is not None:
        on_progress(result)
    return result


def prepare(folder: Path, plan: Path, *, size: int | None, device: str, log: Path) -> None:
    """A one-device plan for the model folder at ``plan`` (``accel plan``), unless one is there."""
    if plan.exists():
        return
    cmd = ["plan", str(folder), "--devices", "1", "--device", device, "-o", str(plan)]
    if size is not None:
        cmd += ["--height", str(size), "--width", str(size)]
    _, _, code, _ = _timed(_accel(*cmd), dict(os.environ), log)
    if code != 0:
        raise RuntimeError(f"accel plan {folder} failed (exit {code}); see {log}.")


def typical_runs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per mode, in order: the median of its runs by total time (a failed run where one failed),
    with ``totals_s``: every run's total, for the spread."""
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for run in result["runs"]:
        by_mode.setdefault(run["mode"], []).append(run)
    typical = []
    for runs in by_mode.values():
        failed = [r for r in runs if "error" in r]
        if failed:
            typical.append(failed[0])
            continue
        ordered = sorted(runs, key=lambda r: r["total_s"])
        typical.append({**ordered[(len(ordered) - 1) // 2], "totals_s": [r["total_s"] for r in runs]})
    return typical


def markdown(result: dict[str, Any]) -> str:
    """The start-up table: one row per mode (its median run), total and parts in seconds."""
    case, env, ver = result["case"], result["environment"], result["versions"]
    lines = [
        f"`accel run {Path(case['target']).name} --devices {case['devices']} --steps {case['steps']}` "
        f"({case.get('precision') or 'model dtype'}), {env.get('gpus', 0)} x {env.get('gpu', 'CPU')}, "
        f"torch {ver.get('torch')}, diffusers {ver.get('diffusers')}, {result['date']}. Every run is a fresh "
        "process with empty inductor and accel caches (a machine's first start).",
        "",
        "| mode | process start to image s | runs: min-max s | "
        + " | ".join(f"{p} s" for p in PARTS)
        + " | first call ms/step | warm call ms/step "
        "| loaded / compiled stages |",
        "|---|" + "---|" * (len(PARTS) + 5),
    ]
    for run in typical_runs(result):
        if "error" in run:
            lines.append(f"| {run['mode']} | failed: {run['error']} |" + " |" * (len(PARTS) + 4))
            continue
        parts = " | ".join(f"{run['parts_s'][p]:.1f}" for p in PARTS)
        totals = run["totals_s"]
        spread = f"{len(totals)}: {min(totals):.1f}-{max(totals):.1f}" if len(totals) > 1 else "1"
        lines.append(
            f"| {run['mode']} | {run['total_s']:.1f} | {spread} | {parts} | {run['first_call_ms_per_step']:.1f} "
            f"| {_ms(run.get('warm_call_ms_per_step'))} | {run['loaded_stages']} / {run['compiled_stages']} |"
        )
    if any(len(r.get("totals_s", ())) > 1 for r in typical_runs(result)):
        lines += ["", "Each row is the mode's median run by total time; every run is in the JSON."]
    if result["exports"]:
        lines.append("")
    for item in result["exports"]:
        if item.get("reused"):
            lines.append(f"- `{item['backend']}` engines: exported by an earlier run, reused.")
            continue
        lines.append(
            f"- `accel export --backend {item['backend']}`: {item['seconds']:.1f} s (exit "
            f"{item['returncode']}; the exports ran side by side)."
        )
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot(result: dict[str, Any], path: Path) -> None:
    """A stacked bar per mode: where the seconds to the first image go."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in typical_runs(result) if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.6 * max(1, len(runs))))
    for i, run in enumerate(runs):
        left = 0.0
        for part in PARTS:
            width = max(0.0, run["parts_s"][part])
            ax.barh(i, width, left=left, color=f"C{PARTS.index(part)}", label=part if i == 0 else None)
            left += width
    ax.set_yticks(range(len(runs)), [r["mode"] for r in runs])
    ax.set_xlabel("seconds from process start to the first image written")
    if runs:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def save(result: dict[str, Any], stem: Path) -> list[Path]:
    """``stem.json``, ``stem.md`` and ``stem.png``."""
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    write_text_atomic(paths[0], json.dumps(result, indent=2, default=str) + "\n")
    write_text_atomic(paths[1], markdown(result))
    plot(result, paths[2])
    return paths
