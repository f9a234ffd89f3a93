"""Many prompts from a file, in batches, one image per prompt with its own seed, into a folder.

    accel run examples/batch_prompts.py --devices 2 -- --model /path/to/sdxl prompts.txt -o out/
    accel run examples/batch_prompts.py --devices 2 --accelerator cpu -- --demo sdxl prompts.txt -o out/

Image ``i`` uses seed ``SEED + i``, so it comes out the same whatever the batch size. Every rank
computes every image; rank 0 writes them. (``accel run MODEL --prompts-file prompts.txt -o out/`` does
the same without a script.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import accel


def load(args: argparse.Namespace) -> object:
    if args.demo:
        from accel.testing import build_pipeline

        return build_pipeline(args.demo)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float16)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a diffusers pipeline folder (or hub id)")
    source.add_argument("--demo", choices=("sdxl", "sd3"), help="a built-in tiny pipeline (CPU, no download)")
    parser.add_argument("prompts", type=Path, help="a text file, one prompt per line")
    parser.add_argument("-o", "--output", type=Path, default=Path("out"), help="folder for the images")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]

    pipe = accel.wrap(load(args), devices=2)
    rank = pipe.accelerator.rank
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        generators = [torch.Generator().manual_seed(args.seed + start + i) for i in range(len(batch))]
        images = pipe(
            batch, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generators
        ).images
        if rank == 0:
            args.output.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(args.output / f"{start + i:04d}.png")
            print(
                f"{start + len(batch)}/{len(prompts)} images, {pipe.last_report.seconds:.2f} s for this batch"
            )
    pipe.accelerator.teardown()


if __name__ == "__main__":
    main()
