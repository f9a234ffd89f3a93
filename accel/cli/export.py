"""``accel export``: compile every stage of a plan once and write the engine files + manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, get_args

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from accel.cli.common import DEVICE_KINDS, check_device, check_writable, choices, fail
from accel.quiet import quiet_third_party
from accel.settings import PRECISIONS, Backend, SettingsError, Tuning
from accel.source import ModelSource

#: What ``accel export`` can write: every backend but eager.
EXPORT_CHOICES = tuple(b for b in get_args(Backend) if b != "eager")
#: What ``--tune`` takes: ``all`` or the options of :class:`~accel.settings.Tuning`.
TUNING_CHOICES = ("all", *(f.name for f in dataclasses.fields(Tuning)))


def export(
    plan_file: Path = typer.Argument(..., help="A plan file written by `accel plan`."),
    backend: str = typer.Option(
        "inductor",
        "--backend",
        "-b",
        help=f"{choices(EXPORT_CHOICES)} (`accel doctor` lists usable ones).",
    ),
    output: Path = typer.Option(Path("engines"), "--output", "-o", help="The engine directory to write."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Recompile engines even if fitting ones exist."),
    vae: bool = typer.Option(True, "--vae/--no-vae", help="Also export the pipeline's VAE decoder."),
    tune: list[str] = typer.Option(
        [],
        "--tune",
        metavar="<option,...>",
        help=f"inductor and aot: tuning options, exact, paid once at export: {choices(TUNING_CHOICES)} "
        "(comma-separated or repeated). fused_qkv: each attention's q/k/v projections as one matrix product "
        "(a run fuses the live denoiser the same way before loading); coordinate_descent: tune each "
        "kernel's launch parameters; conv_1x1_as_mm: 1x1 convolutions as matrix products; autotune: "
        "benchmark GEMM/convolution choices (minutes per stage). The manifest records it; engines built "
        "otherwise are rebuilt.",
    ),
    tune_budget: float = typer.Option(
        None,
        "--tune-budget",
        min=1.0,
        metavar="<seconds>",
        help="Wall-clock seconds each stage's coordinate_descent/autotune searches may take; a stage past it "
        "is built without them (recorded in the manifest; `accel inspect` shows it; --rebuild retries). "
        "Default: no limit.",
    ),
    device: str = typer.Option(
        None,
        "--device",
        help=f"{choices(DEVICE_KINDS)} (default: the plan's device type when available, else cpu).",
    ),
) -> None:
    """Compile each stage of each phase of the plan and save it as an engine file in an engine directory."""
    quiet_third_party()  # before the deferred imports below
    # Deferred: these import torch and diffusers, which `accel --help` must not wait for.
    import torch

    from accel.compile.backends import EXPORT_BACKENDS, BackendError, get_backend
    from accel.compile.engines import StageJob, export_plan
    from accel.compile.store import TUNING_NOTE, EngineError
    from accel.plan import PlanError, load_plan
    from accel.targets import load_components

    console = Console(stderr=True)
    if backend not in EXPORT_BACKENDS:
        raise typer.BadParameter(f"--backend {backend!r} is not one of {', '.join(EXPORT_BACKENDS)}.")
    try:
        impl = get_backend(backend, Tuning.parse(tune) if tune else None)
    except (BackendError, SettingsError) as exc:
        raise typer.BadParameter(f"--tune: {exc}") from None
    if tune_budget is not None and not impl.tuning.searches:
        raise typer.BadParameter(
            "--tune-budget bounds the coordinate_descent and autotune searches; add one of them to --tune."
        )
    reason = impl.available()
    if reason is not None:
        fail(console, f"backend {backend!r} is unavailable: {reason}")
    try:
        plan = load_plan(plan_file)
    except PlanError as exc:
        fail(console, str(exc))
    check_writable(console, output)
    if device is None:
        device = plan.device_type if plan.device_type != "cuda" or torch.cuda.is_available() else "cpu"
    check_device(device)

    denoiser, _, decoder_source = load_components(
        ModelSource.from_dict(plan.source), dtype=PRECISIONS[plan.dtype], device=device, vae=vae
    )
    try:
        plan.validate_for(denoiser)
    except PlanError as exc:
        fail(console, str(exc))

    columns: tuple[Any, ...] = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        tasks: dict[str, Any] = {}
        kept: list[str] = []

        def on_stage(job: StageJob, event: str) -> None:
            if event == "start":
                tasks[job.key] = progress.add_task(f"{backend} {job.key}", total=1)
            else:
                progress.update(tasks[job.key], completed=1)
                if event == "kept":
                    kept.append(job.key)

        try:
            with torch.no_grad():
                records = export_plan(
                    plan,
                    denoiser,
                    impl,
                    output,
                    rebuild=rebuild,
                    on_stage=on_stage,
                    vae=decoder_source,
                    tune_budget_s=tune_budget,
                )
        except (EngineError, BackendError, ValueError) as exc:
            fail(console, str(exc), code=1)
    over = [r.key for r in records if TUNING_NOTE in r.extra]
    if over:
        console.print(
            f"{len(over)} engine(s) built without their tuning searches, which ran past --tune-budget: "
            f"{', '.join(over)} (`accel inspect {output}` shows it; --rebuild tries again)",
            highlight=False,
        )
    total = sum(r.size for r in records)
    console.print(
        f"wrote {len(records) - len(kept)} engine(s), kept {len(kept)} that fit ({total / 1e6:.1f} MB in all) "
        f"in {output} (manifest.json)",
        highlight=False,
    )
