"""SDXL with its two guidance branches on two GPUs.

torchrun --nproc-per-node 2 examples/sdxl_torchrun.py /path/to/stable-diffusion-xl-base-1.0
"""

from __future__ import annotations

import sys

import torch
from diffusers import StableDiffusionXLPipeline

import accel

pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float16)
pipe = accel.wrap(pipe, devices=2)  # joins torchrun's process group, moves the pipeline to this rank's GPU
result = pipe(
    "an astronaut in a jungle, cold color palette, detailed, 8k",
    num_inference_steps=50,
    guidance_scale=5.0,
    generator=torch.Generator("cpu").manual_seed(0),
)
if pipe.accelerator.rank == 0:
    result.images[0].save("sdxl.png")
    print(pipe.last_report)
