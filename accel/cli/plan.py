"""``accel plan``: profile a denoiser, cut it into balanced stages and write a plan file."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from accel.cli.common import DEVICE_KINDS, check_device, check_writable, choices, fail, plan_table
from accel.quiet import quiet_third_party
from accel.settings import PRECISIONS, Precision
from accel.source import ARCHS, DEMOS, ModelSource, SourceError

#: ``--layout`` choices: ``auto`` picks the cheaper of the partition layouts.
LAYOUTS = ("auto", "chain", "onion")


def plan(
    model: str = typer.Argument(None, help="A diffusers pipeline folder or hub id (or use --demo / --arch)."),
    demo: str = typer.Option(
        None, "--demo", help=f"A built-in tiny pipeline: {choices(DEMOS)} (no download, CPU)."
    ),
    arch: str = typer.Option(
        None, "--arch", help=f"A full-size architecture with random weights: {choices(ARCHS)}."
    ),
    seed: int = typer.Option(0, "--seed", help="Weights seed for --arch."),
    height: int = typer.Option(
        None, "--height", min=8, help="Image height in pixels (default: the model's)."
    ),
    width: int = typer.Option(None, "--width", min=8, help="Image width in pixels (default: the model's)."),
    devices: int = typer.Option(2, "--devices", min=1, help="Number of pipeline stages (one device each)."),
    batch: list[int] = typer.Option(
        None,
        "--batch",
        min=1,
        help="Images per guidance branch on one device (default 1); repeat for several batch sizes: each gets "
        "its engines in `accel export`, and `accel serve` batches requests to them. The first is profiled.",
    ),
    dtype: str = typer.Option(
        None, "--dtype", help=f"{choices(Precision)} (default: fp16 on cuda, fp32 on cpu)."
    ),
    device: str = typer.Option(
        None, "--device", help=f"{choices(DEVICE_KINDS)} (default: cuda when available)."
    ),
    text_len: int = typer.Option(None, "--text-len", min=1, help="Text tokens (default: 77 U-Net, 333 SD3)."),
    layout: str = typer.Option("auto", "--layout", help=f"{choices(LAYOUTS)}."),
    link_gbps: float = typer.Option(None, "--link-gbps", help="Link bandwidth between devices in GB/s."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed runs per unit."),
    repeat: int = typer.Option(10, "--repeat", min=1, help="Timed runs per unit (the median is kept)."),
    output: Path = typer.Option(Path("plan.json"), "--output", "-o", help="Where to write the plan."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON instead of a table."),
) -> None:
    """Profile the denoiser, cut it into stages of equal cost and write a plan file."""
    quiet_third_party()  # before the deferred imports below
    # Deferred: these import torch and diffusers, which `accel --help` must not wait for.
    import torch

    from accel.jobs import plan_worlds
    from accel.models import UnsupportedModelError
    from accel.partition import PartitionError
    from accel.plan import PlanError, build_plan
    from accel.targets import load_denoiser

    batches = list(dict.fromkeys(batch or [1]))
    try:
        source = ModelSource.choose(model, demo, arch, seed)
    except SourceError as exc:
        raise typer.BadParameter(str(exc)) from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    dtype = dtype or ("fp16" if device == "cuda" else "fp32")
    if dtype not in PRECISIONS:
        raise typer.BadParameter(f"--dtype {dtype!r} is not one of {', '.join(PRECISIONS)}.")
    if layout not in LAYOUTS:
        raise typer.BadParameter(f"--layout {layout!r} is not {choices(LAYOUTS)}.")
    if link_gbps is not None and not link_gbps > 0:
        raise typer.BadParameter(f"--link-gbps must be > 0, got {link_gbps}.")

    console = Console(stderr=as_json)
    check_writable(Console(stderr=True), output)
    # Plain messages, no live spinner: a refresh thread contends for the GIL and inflates CPU-side timings.
    console.print(f"loading {model or demo or arch} ({dtype}, {device})")
    try:
        denoiser, vae_scale_factor = load_denoiser(source, dtype=PRECISIONS[dtype], device=device)
    except (OSError, ValueError) as exc:
        where = " from the model hub (there is no local folder of that name)" if source.kind == "hub" else ""
        raise typer.BadParameter(f"cannot load {model or demo or arch}{where}: {exc}") from exc
    sample_size = denoiser.config.get("sample_size", 128)
    sample_size = sample_size[0] if isinstance(sample_size, list | tuple) else sample_size
    height = height or int(sample_size) * vae_scale_factor
    width = width or int(sample_size) * vae_scale_factor
    try:
        console.print(f"profiling {type(denoiser).__name__} at {height}x{width}, batch {batches[0]}")
        result = build_plan(
            denoiser,
            source=source.to_dict(),
            height=height,
            width=width,
            devices=devices,
            batch=batches[0],
            more_batches=batches[1:],
            vae_scale_factor=vae_scale_factor,
            text_len=text_len,
            layout=layout,
            link_gbps=link_gbps,
            warmup=warmup,
            repeat=repeat,
        )
    except (UnsupportedModelError, PartitionError, PlanError, ValueError) as exc:
        fail(Console(stderr=True), str(exc), code=1)
    written = result.save(output)
    worlds = " or ".join(str(w) for w in plan_worlds(result.devices))
    where = (
        f"accel run {written} runs it on {worlds} process(es) (--devices {plan_worlds(result.devices)[0]})"
        + ("" if result.devices <= 2 else f": each guidance branch pipelines over {result.devices} devices")
    )
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        Console(stderr=True).print(where, highlight=False)
        return
    console.print(plan_table(result, written))
    console.print(where, highlight=False)
