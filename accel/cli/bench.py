"""``accel bench``: measure accel.

``--model sdxl|sd3`` runs the speed suite (configurations A-E, :mod:`accel.bench.speed`), ``--quality``
the quality suite (:mod:`accel.bench.quality`), ``--startup FOLDER`` the start-up suite
(:mod:`accel.bench.startup`), ``--report FILE...`` rewrites the speed tables and plot.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from accel.bench.configs import CONFIGS, DEFAULT_CONFIGS, DEFAULT_EXPERT_MODE, EXPERT_MODES, WINDOW_MODES
from accel.bench.startup import MODES as STARTUP_MODES
from accel.cli.common import fail

DEFAULT_QUALITY_OUTPUT = Path("docs/benchmarks/quality")
SUITES = ("--model sdxl|sd3 (speed)", "--quality", "--startup FOLDER", "--report FILE.json ...")


def bench(
    quality: bool = typer.Option(
        False,
        "--quality",
        help="Quality suite: the trained digit models, exact vs CFG split vs every hybrid window mode "
        "(2 CPU processes).",
    ),
    family: list[str] = typer.Option(
        ["sdxl", "sd3"], "--family", help="Quality model family (repeat for several): sdxl, sd3."
    ),
    seeds: int = typer.Option(10, "--seeds", min=1, help="Seeds per digit (each seed generates 0-9)."),
    steps: int = typer.Option(50, "--steps", min=2, help="Denoising steps per call."),
    weights: Path = typer.Option(
        None, "--weights", help="Folder with trained quality models (default: the committed ones)."
    ),
    output: Path = typer.Option(
        DEFAULT_QUALITY_OUTPUT,
        "--output",
        "-o",
        help="Quality: folder for the JSON, markdown and PNGs. Speed: the JSON file "
        "(default accel-bench-MODEL-HxW.json).",
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the PNG figures (matplotlib)."),
    model: str = typer.Option(
        None, "--model", help="Speed suite for this full-size architecture (sdxl, sd3) on 2 GPUs."
    ),
    height: int = typer.Option(1024, "--height", min=8, help="Speed suite: image height in pixels."),
    width: int = typer.Option(1024, "--width", min=8, help="Speed suite: image width in pixels."),
    repeat: int = typer.Option(
        3,
        "--repeat",
        min=1,
        help="Speed suite: timed calls per configuration. Start-up suite: fresh runs per mode (median shown).",
    ),
    configs: str = typer.Option(
        ",".join(DEFAULT_CONFIGS),
        "--configs",
        help=f"Speed suite: subset of {','.join(CONFIGS)} (S: accel on one GPU per backend; A, B, B*, S "
        "need one GPU).",
    ),
    backends: str = typer.Option(
        "inductor", "--backends", help="Speed suite: compiled backends for S and D (each) and E (the first)."
    ),
    window_modes: str = typer.Option(
        ",".join(WINDOW_MODES), "--window-modes", help="Speed suite: window guidance modes for E."
    ),
    schedule: str = typer.Option("adaptive", "--schedule", help="Speed suite: E's schedule (or START,END)."),
    engines: list[Path] = typer.Option(
        None,
        "--engines",
        help="Speed suite: engine directory of each backend, in the order of --backends (repeat the option).",
    ),
    plan: Path = typer.Option(None, "--plan", help="Speed suite: the plan file for E (the engines' plan)."),
    expert_mode: str = typer.Option(
        DEFAULT_EXPERT_MODE,
        "--expert-mode",
        help=f"Speed suite: B*'s torch.compile mode on a GPU, {' or '.join(EXPERT_MODES)} (reduce-overhead: "
        "the recipe without GEMM autotuning, minutes less compilation).",
    ),
    tiny: bool = typer.Option(False, "--tiny", help="Speed suite: tiny pipelines on the CPU (a dry run)."),
    report_files: list[Path] = typer.Option(
        None, "--report", help="Rewrite README.md and latency.png beside these speed-suite JSON files."
    ),
    startup: Path = typer.Option(
        None,
        "--startup",
        help="Start-up suite: time `accel run FOLDER --devices 1` from process start to the first image "
        "written, per mode; writes OUTPUT.json, .md and .png (default OUTPUT accel-startup).",
    ),
    startup_modes: str = typer.Option(
        ",".join(STARTUP_MODES), "--modes", help=f"Start-up suite: subset of {','.join(STARTUP_MODES)}."
    ),
    work: Path = typer.Option(
        None,
        "--work",
        help="Start-up suite: folder for the plan, engines and images (default: a temp folder).",
    ),
) -> None:
    """Measure accel: the speed suite (``--model``), the quality suite (``--quality``) or ``--report``."""
    console = Console()
    chosen = [quality, model is not None, bool(report_files), startup is not None]
    if sum(chosen) != 1:
        raise typer.BadParameter(f"choose one suite: {', '.join(SUITES)}.")
    if startup is not None:
        stem = Path("accel-startup") if output == DEFAULT_QUALITY_OUTPUT else output
        _startup(console, startup, plan, startup_modes, steps, work, stem, repeat)
        return
    if report_files:
        _report(console, report_files)
        return
    if model is not None:
        _speed(
            console,
            model,
            height,
            width,
            steps,
            repeat,
            configs,
            backends,
            window_modes,
            schedule,
            engines,
            plan,
            tiny,
            output,
            expert_mode,
        )
        return
    # Deferred (here and below): the suites import torch and diffusers; `accel --help` imports this module.
    from accel.bench.plots import plot_report
    from accel.bench.quality import FAMILIES, run_quality, write_report

    unknown = sorted(set(family) - set(FAMILIES))
    if unknown:
        raise typer.BadParameter(f"--family {', '.join(unknown)}: choose from {', '.join(FAMILIES)}.")
    with console.status("running the quality suite (exact, CFG split, hybrid modes) ..."):
        report = run_quality(family, seeds=range(seeds), steps=steps, root=weights, keep_images=plots)
    written = write_report(report, output) + (plot_report(report, output) if plots else [])
    for result in report.families:
        table = Table(title=f"{result.family}: {10 * seeds} samples, {steps} steps")
        table.add_column("mode", no_wrap=True)
        for column in ("window", "accuracy", "p(requested)", "agrees", "PSNR mean/min dB", "latent MAE"):
            table.add_column(column)
        for r in result.modes:
            window = f"{r.window[0]}-{r.window[1]}" if r.window is not None else ""
            table.add_row(
                r.name,
                window,
                f"{100 * r.accuracy:.0f} %",
                f"{r.confidence:.4f}",
                f"{100 * r.agreement:.0f} %",
                f"{r.psnr_mean_db:.1f} / {r.psnr_min_db:.1f}",
                f"{r.latent_mae:.4f}",
            )
        console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in written))


def _startup(
    console: Console,
    folder: Path,
    plan: Path | None,
    modes: str,
    steps: int,
    work: Path | None,
    stem: Path,
    repeat: int,
) -> None:
    import tempfile

    from accel.bench.startup import StartupCase, prepare, save, suite

    chosen = [m for m in modes.split(",") if m]
    unknown = sorted(set(chosen) - set(STARTUP_MODES))
    if unknown:
        raise typer.BadParameter(f"--modes {', '.join(unknown)}: choose from {', '.join(STARTUP_MODES)}.")
    work = work if work is not None else Path(tempfile.mkdtemp(prefix="accel-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "startup.log"
    on_gpu = _has_cuda()
    if plan is None and set(chosen) & {"inductor", "aot", "inductor-cold"}:
        plan = work / "plan.json"
        with console.status(f"accel plan {folder} --devices 1 ..."):
            prepare(folder, plan, size=None, device="cuda" if on_gpu else "cpu", log=log)
    case = StartupCase(
        target=str(plan if plan is not None else folder),
        plan=str(plan) if plan is not None else None,
        steps=steps,
        precision="fp16" if on_gpu else None,
    )
    with console.status(f"timing start-up: {', '.join(chosen)} (log: {log}) ..."):
        suite(case, chosen, work, log, lambda r: save(r, stem), repeat=repeat)
    console.print(Path(stem).with_suffix(".md").read_text(), markup=False, highlight=False)
    console.print(f"wrote {stem}.json, .md, .png", highlight=False)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _speed(
    console: Console,
    model: str,
    height: int,
    width: int,
    steps: int,
    repeat: int,
    configs: str,
    backends: str,
    window_modes: str,
    schedule: str,
    engines: list[Path] | None,
    plan: Path | None,
    tiny: bool,
    output: Path,
    expert_mode: str,
) -> None:
    import torch

    from accel.bench.speed import SuiteSettings, parse_names, parse_schedule, run_suite, save

    window = parse_schedule(schedule)
    try:
        settings = SuiteSettings(
            model=model,
            height=height,
            width=width,
            steps=steps,
            repeat=repeat,
            configs=parse_names(configs),
            backends=parse_names(backends),
            window_modes=parse_names(window_modes),
            schedule=window,
            engines=tuple(str(e) for e in engines or ()),
            plan=None if plan is None else str(plan),
            tiny=tiny,
            expert_mode=expert_mode,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not tiny and torch.cuda.device_count() < settings.gpus:
        needed = f"{settings.gpus} CUDA GPU{'s' if settings.gpus > 1 else ''}"
        fail(
            Console(stderr=True),
            f"the speed suite needs {needed} for --configs {configs}; this machine has "
            f"{torch.cuda.device_count()}. Run it on a host with {needed}, keep to the one-GPU configurations "
            "(A,B,B*,S), or pass --tiny for a CPU dry run.",
            code=1,
        )
    if output == DEFAULT_QUALITY_OUTPUT:
        output = Path(f"accel-bench-{model}-{height}x{width}.json")
    with console.status("running the speed suite ...") as status:
        result = run_suite(
            settings,
            on_phase=lambda phase: status.update(f"speed suite: {phase}"),
            on_partial=lambda partial: save(partial, output),
        )
    save(result, output)
    from accel.bench.report import markdown

    console.print(markdown(result))
    console.print(f"wrote {output}")


def _report(console: Console, files: list[Path]) -> None:
    from accel.bench.report import write_report

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        fail(Console(stderr=True), f"no such result file: {', '.join(missing)}", code=1)
    folder = files[0].parent
    write_report(files, folder / "README.md", folder / "latency.png")
    console.print(f"wrote {folder / 'README.md'} and {folder / 'latency.png'}")
