"""SDXL with its two guidance branches on two GPUs; the same file runs under every launcher.

accel run examples/sdxl_torchrun.py --devices 2 -- /path/to/stable-diffusion-xl-base-1.0
torchrun --nproc-per-node 2 examples/sdxl_torchrun.py /path/to/stable-diffusion-xl-base-1.0
python examples/sdxl_torchrun.py /path/to/stable-diffusion-xl-base-1.0   # starts the 2nd process itself
"""

from __future__ import annotations

import argparse

import torch
from diffusers import StableDiffusionXLPipeline

import accel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a StableDiffusionXLPipeline folder (or hub id)")
    parser.add_argument("--prompt", default="an astronaut in a jungle, cold color palette, detailed, 8k")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strategy", choices=("cfg", "hybrid"), default="cfg")
    parser.add_argument("--backend", default="eager", help="eager, inductor, aot, onnx or tensorrt")
    parser.add_argument("-o", "--output", default="sdxl.png")
    args = parser.parse_args(argv)

    pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=torch.float16)
    # Joins the process group of `accel run` / torchrun and moves the pipeline to this rank's GPU.
    pipe = accel.wrap(pipe, devices=2, strategy=args.strategy, backend=args.backend)
    result = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(0),
    )
    if pipe.accelerator.rank == 0:
        result.images[0].save(args.output)
        print(pipe.last_report)
    pipe.accelerator.teardown()


if __name__ == "__main__":
    main()
