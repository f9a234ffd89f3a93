"""``accel run``: generate images with an accelerated pipeline, launching the worker processes itself."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from accel.atomic import atomic_path
from accel.cli.app import app


@dataclass(frozen=True)
class GenerationJob:
    """What each worker generates (picklable, sent to spawned processes)."""

    model: str | None
    demo: str | None
    prompts: list[str]
    negative_prompt: str | None
    steps: int
    guidance: float
    height: int | None
    width: int | None
    seed: int
    precision: str | None
    output: str
    warmup: int


def _load(job: GenerationJob) -> Any:
    import torch

    if job.demo is not None:
        from accel.testing import build_pipeline

        return build_pipeline(job.demo)
    from diffusers import DiffusionPipeline

    assert job.model is not None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(job.precision or "")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    return DiffusionPipeline.from_pretrained(job.model, **kwargs)


def _save_png(image: Any, path: Path) -> None:
    """Write atomically: a partial file never appears under the final name."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _generate(acc: Any, job: GenerationJob) -> dict[str, Any]:
    import torch

    import accel

    pipe = acc.wrap(_load(job))
    call: dict[str, Any] = dict(
        prompt=job.prompts,
        negative_prompt=[job.negative_prompt] * len(job.prompts) if job.negative_prompt else None,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
    )
    if job.height is not None:
        call["height"] = job.height
    if job.width is not None:
        call["width"] = job.width
    for _ in range(job.warmup):
        pipe(**call, generator=torch.Generator("cpu").manual_seed(job.seed))
    images = pipe(**call, generator=torch.Generator("cpu").manual_seed(job.seed)).images
    report = pipe.last_report
    accel.unwrap(pipe)
    written = []
    if acc.rank == 0:
        out = Path(job.output)
        for i, image in enumerate(images):
            path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
            _save_png(image, path)
            written.append(str(path))
    return {"report": asdict(report), "images": written}


@app.command("run")
def run(
    model: str = typer.Argument(None, help="A local diffusers pipeline folder (or use --demo)."),
    demo: str = typer.Option(
        None, "--demo", help="A built-in tiny pipeline that needs no download: sdxl or sd3."
    ),
    prompt: list[str] = typer.Option(["a photo of an astronaut riding a horse"], "--prompt", "-p"),
    prompt_file: Path = typer.Option(
        None, "--prompt-file", help="One prompt per line, generated as one batch."
    ),
    negative_prompt: str = typer.Option(None, "--negative-prompt"),
    steps: int = typer.Option(20, "--steps", min=1),
    guidance: float = typer.Option(5.0, "--guidance"),
    height: int = typer.Option(None, "--height", min=8),
    width: int = typer.Option(None, "--width", min=8),
    seed: int = typer.Option(0, "--seed"),
    devices: int = typer.Option(2, "--devices", min=1),
    accelerator: str = typer.Option("auto", "--accelerator", help="auto, cpu or cuda."),
    precision: str = typer.Option(None, "--precision", help="fp32, fp16 or bf16 (default: the pipeline's)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed calls before the timed one."),
    output: Path = typer.Option(Path("accel-out.png"), "--output", "-o"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Generate images on several devices (spawns one process per device)."""
    import accel

    if (model is None) == (demo is None):
        raise typer.BadParameter("give either a MODEL folder or --demo sdxl|sd3, not both and not neither.")
    if model is not None and not Path(model, "model_index.json").is_file():
        raise typer.BadParameter(
            f"{model} is not a diffusers pipeline folder (no model_index.json). "
            "Pass the folder that DiffusionPipeline.from_pretrained() loads, or --demo sdxl."
        )
    prompts = list(prompt)
    if prompt_file is not None:
        prompts = [line.strip() for line in prompt_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise typer.BadParameter(f"{prompt_file} holds no prompts.")
    try:
        acc = accel.Accelerator(devices=devices, accelerator=accelerator, precision=precision)
    except (accel.SettingsError, accel.DeviceUnavailableError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    job = GenerationJob(
        model=model,
        demo=demo,
        prompts=prompts,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        seed=seed,
        precision=precision,
        output=str(output),
        warmup=warmup,
    )
    result = acc.launch(_generate, job)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    r = result["report"]
    table = Table(title=f"accel run: {demo or model}, {devices} device(s), {steps} steps")
    for column in (
        "ranks",
        "images",
        "seconds",
        "per step (ms)",
        "denoiser calls",
        "collectives",
        "KiB sent",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        str(r["world_size"]),
        str(len(prompts)),
        f"{r['seconds']:.3f}",
        f"{1000 * r['seconds'] / steps:.1f}",
        str(r["denoiser_calls"]),
        str(r["collectives"]),
        f"{r['bytes_sent'] / 1024:.1f}",
    )
    console = Console()
    console.print(table)
    for path in result["images"]:
        console.print(f"wrote {path}")
