"""SD3 on two GPUs, a batch of prompts read from a file (one per line), launched from Python.

python examples/sd3_batch.py /path/to/stable-diffusion-3-medium-diffusers prompts.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

import accel


def generate(acc: accel.Accelerator, model: str, prompts: list[str]) -> list[str]:
    pipe = acc.wrap(StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch.float16))
    images = pipe(
        prompts, num_inference_steps=28, guidance_scale=7.0, generator=torch.Generator().manual_seed(0)
    )
    paths = []
    if acc.rank == 0:
        for i, image in enumerate(images.images):
            paths.append(f"sd3-{i}.png")
            image.save(paths[-1])
    return paths


if __name__ == "__main__":
    prompts = [line.strip() for line in Path(sys.argv[2]).read_text().splitlines() if line.strip()]
    print(accel.Accelerator(devices=2).launch(generate, sys.argv[1], prompts))
