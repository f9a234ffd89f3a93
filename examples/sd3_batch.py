"""SD3 on two GPUs, a batch of prompts read from a file (one per line), launched from Python.

    accel run examples/sd3_batch.py --devices 2 -- /path/to/stable-diffusion-3-medium-diffusers prompts.txt
    python examples/sd3_batch.py /path/to/stable-diffusion-3-medium-diffusers prompts.txt

``Accelerator.launch(fn)`` spawns the processes itself; under ``accel run`` (or torchrun) they exist
already, so each process joins and calls ``fn`` directly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

import accel


def generate(acc: accel.Accelerator, model: str, prompts: list[str], steps: int) -> list[str]:
    pipe = acc.wrap(StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch.float16))
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=7.0, generator=generators).images
    paths = []
    if acc.rank == 0:
        for i, image in enumerate(images):
            paths.append(f"sd3-{i}.png")
            image.save(paths[-1])
        print(f"wrote {', '.join(paths)}")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a StableDiffusion3Pipeline folder (or hub id)")
    parser.add_argument("prompts", type=Path, help="a text file, one prompt per line")
    parser.add_argument("--steps", type=int, default=28)
    args = parser.parse_args(argv)
    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    accel.Accelerator(devices=2).launch(generate, args.model, prompts, args.steps)


if __name__ == "__main__":
    main()
