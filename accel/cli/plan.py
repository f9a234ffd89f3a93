"""``accel plan``: profile a denoiser, cut it into balanced stages and write a plan file."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from accel.cli.app import app

logger = logging.getLogger(__name__)

DEMOS = ("sdxl", "sd3")
ARCHS = ("sdxl-base-1.0", "sd3-medium")
DENOISERS = ("unet", "transformer")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def model_source(model: str | None, demo: str | None, arch: str | None, seed: int = 0) -> dict[str, Any]:
    """The plan's ``source`` entry for the command-line choice; ``typer.BadParameter`` when it is invalid."""
    given = [x for x in (model, demo, arch) if x is not None]
    if len(given) != 1:
        raise typer.BadParameter(
            "give exactly one of MODEL (a diffusers folder or hub id), --demo or --arch."
        )
    if demo is not None:
        if demo not in DEMOS:
            raise typer.BadParameter(f"--demo {demo!r} is not one of {', '.join(DEMOS)}.")
        return {"kind": "demo", "name": demo}
    if arch is not None:
        if arch not in ARCHS:
            raise typer.BadParameter(f"--arch {arch!r} is not one of {', '.join(ARCHS)}.")
        return {"kind": "arch", "name": arch, "seed": seed}
    assert model is not None
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise typer.BadParameter(
                f"{model} is not a diffusers pipeline folder (no model_index.json). Pass the folder that "
                "DiffusionPipeline.from_pretrained() loads, or use --demo sdxl / --arch sdxl-base-1.0."
            )
        return {"kind": "folder", "path": str(path.resolve())}
    if _HUB_ID.match(model):
        return {"kind": "hub", "id": model}
    raise typer.BadParameter(
        f"{model}: no such folder. Pass a diffusers pipeline folder (with model_index.json) or a hub id "
        "such as stabilityai/stable-diffusion-xl-base-1.0, or use --demo sdxl."
    )


def _named_pipeline(source: dict[str, Any], *, dtype: Any, device: str) -> Any:
    """The tiny demo or full-size random-weight pipeline a ``demo``/``arch`` plan source names."""
    from accel.testing import build_pipeline

    kwargs: dict[str, Any] = {"dtype": dtype, "device": device}
    if "seed" in source:
        kwargs["seed"] = source["seed"]
    return build_pipeline(source["name"], **kwargs)


def load_denoiser(source: dict[str, Any], *, dtype: Any, device: str) -> tuple[Any, int]:
    """The denoiser named by a plan ``source`` on ``device`` in ``dtype``, and its VAE scale factor.

    For a folder or hub id only the denoiser component (and the VAE config) is loaded, not the text
    encoders: profiling needs nothing else.
    """
    denoiser, scale, _ = load_components(source, dtype=dtype, device=device, vae=False)
    return denoiser, scale


def load_components(
    source: dict[str, Any], *, dtype: Any, device: str, vae: bool
) -> tuple[Any, int, Any | None]:
    """:func:`load_denoiser`, plus the pipeline's VAE when ``vae`` (``None`` when it has none)."""
    from accel.wrapper import find_denoiser

    if source["kind"] in ("demo", "arch"):
        pipe = _named_pipeline(source, dtype=dtype, device=device)
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        return find_denoiser(pipe)[1].eval(), scale, getattr(pipe, "vae", None) if vae else None

    import diffusers
    from diffusers import DiffusionPipeline

    location = source["path"] if source["kind"] == "folder" else source["id"]
    index = DiffusionPipeline.load_config(location)
    component = next((name for name in DENOISERS if isinstance(index.get(name), list | tuple)), None)
    if component is None:
        raise ValueError(f"{location}: model_index.json names no 'unet' or 'transformer' component.")
    class_name = index[component][1]
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(
            f"{location}: the {component} class {class_name!r} is not in diffusers {diffusers.__version__}."
        )
    denoiser = cls.from_pretrained(location, subfolder=component, torch_dtype=dtype).to(device)
    vae_scale_factor = 8
    decoder_vae = None
    if isinstance(index.get("vae"), list | tuple):
        vae_config = diffusers.AutoencoderKL.load_config(location, subfolder="vae")
        vae_scale_factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
        if vae:
            decoder_vae = (
                diffusers.AutoencoderKL.from_pretrained(location, subfolder="vae", torch_dtype=dtype)
                .to(device)
                .eval()
            )
    return denoiser.eval(), vae_scale_factor, decoder_vae


def _segments(segments: Any) -> str:
    return ", ".join(f"{lo}-{hi - 1}" if hi - lo > 1 else f"{lo}" for lo, hi in segments)


def plan_table(plan: Any, output: Path | None = None) -> Table:
    """A rich table of a plan's stages (``accel plan`` and ``accel inspect``)."""
    title = (
        f"accel plan: {plan.model_class} ({len(plan.units)} units), {plan.resolutions[0][0]}x"
        f"{plan.resolutions[0][1]}, batch {plan.batches[0]}, {plan.dtype} on {plan.profile.get('device_name')}, "
        f"{plan.devices} stage(s), {plan.layout}"
    )
    table = Table(title=title)
    for column, justify in (
        ("stage", "right"),
        ("units", "left"),
        ("n", "right"),
        ("ms", "right"),
        ("share", "right"),
        ("boundary MB", "right"),
        ("GFLOP", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    total = sum(s.cost_ms for s in plan.stages) or 1.0
    for k, stage in enumerate(plan.stages):
        table.add_row(
            str(k),
            _segments(stage.segments),
            str(len(stage.units())),
            f"{stage.cost_ms:.3f}",
            f"{100 * stage.cost_ms / total:.1f}%",
            f"{(stage.bytes_in + stage.bytes_out) / 1e6:.3f}",
            f"{stage.flops / 1e9:.2f}",
        )
    table.caption = (
        f"balance (max/mean) {plan.balance:.3f}; {plan.bytes_per_step / 1e6:.3f} MB cross stages per step "
        f"({len(plan.boundary)} tensors)" + (f"; wrote {output}" if output is not None else "")
    )
    return table


@app.command("plan")
def plan(
    model: str = typer.Argument(None, help="A diffusers pipeline folder or hub id (or use --demo / --arch)."),
    demo: str = typer.Option(
        None, "--demo", help="A built-in tiny pipeline: sdxl or sd3 (no download, CPU)."
    ),
    arch: str = typer.Option(
        None, "--arch", help="A full-size architecture with random weights: sdxl-base-1.0 or sd3-medium."
    ),
    seed: int = typer.Option(0, "--seed", help="Weights seed for --arch."),
    height: int = typer.Option(
        None, "--height", min=8, help="Image height in pixels (default: the model's)."
    ),
    width: int = typer.Option(None, "--width", min=8, help="Image width in pixels (default: the model's)."),
    devices: int = typer.Option(2, "--devices", min=1, help="Number of pipeline stages (one device each)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Images per guidance branch on one device."),
    dtype: str = typer.Option(
        None, "--dtype", help="fp16, bf16 or fp32 (default: fp16 on cuda, fp32 on cpu)."
    ),
    device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
    text_len: int = typer.Option(None, "--text-len", min=1, help="Text tokens (default: 77 U-Net, 333 SD3)."),
    layout: str = typer.Option("auto", "--layout", help="auto, chain or onion."),
    link_gbps: float = typer.Option(None, "--link-gbps", help="Link bandwidth between devices in GB/s."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed runs per unit."),
    repeat: int = typer.Option(10, "--repeat", min=1, help="Timed runs per unit (the median is kept)."),
    output: Path = typer.Option(Path("plan.json"), "--output", "-o", help="Where to write the plan."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON instead of a table."),
) -> None:
    """Profile the denoiser, cut it into stages of equal cost and write a plan file."""
    import torch

    from accel.models import UnsupportedModelError
    from accel.partition import PartitionError
    from accel.plan import PlanError, build_plan
    from accel.settings import PRECISIONS

    source = model_source(model, demo, arch, seed)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise typer.BadParameter(f"--device {device!r} is not cuda or cpu.")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda: no CUDA device is available here; use --device cpu.")
    dtype = dtype or ("fp16" if device == "cuda" else "fp32")
    if dtype not in PRECISIONS:
        raise typer.BadParameter(f"--dtype {dtype!r} is not one of {', '.join(PRECISIONS)}.")
    if layout not in ("auto", "chain", "onion"):
        raise typer.BadParameter(f"--layout {layout!r} is not auto, chain or onion.")
    if link_gbps is not None and not link_gbps > 0:
        raise typer.BadParameter(f"--link-gbps must be > 0, got {link_gbps}.")

    console = Console(stderr=as_json)
    # Plain messages, no live spinner: a refresh thread contends for the GIL and inflates CPU-side timings.
    console.print(f"loading {model or demo or arch} ({dtype}, {device})")
    try:
        denoiser, vae_scale_factor = load_denoiser(source, dtype=PRECISIONS[dtype], device=device)
    except (OSError, ValueError) as exc:
        where = (
            " from the model hub (there is no local folder of that name)" if source["kind"] == "hub" else ""
        )
        raise typer.BadParameter(f"cannot load {model or demo or arch}{where}: {exc}") from exc
    sample_size = denoiser.config.get("sample_size", 128)
    sample_size = sample_size[0] if isinstance(sample_size, list | tuple) else sample_size
    height = height or int(sample_size) * vae_scale_factor
    width = width or int(sample_size) * vae_scale_factor
    try:
        console.print(f"profiling {type(denoiser).__name__} at {height}x{width}, batch {batch}")
        result = build_plan(
            denoiser,
            source=source,
            height=height,
            width=width,
            devices=devices,
            batch=batch,
            vae_scale_factor=vae_scale_factor,
            text_len=text_len,
            layout=layout,
            link_gbps=link_gbps,
            warmup=warmup,
            repeat=repeat,
        )
    except (UnsupportedModelError, PartitionError, PlanError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    written = result.save(output)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    console.print(plan_table(result, written))
