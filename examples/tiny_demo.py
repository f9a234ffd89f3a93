"""The tiny offline SDXL pipeline with its two guidance branches on 2 CPU processes (no download).

accel run examples/tiny_demo.py --devices 2 --accelerator cpu -- --steps 20 -o tiny-demo.png
python examples/tiny_demo.py        # starts the second process itself (Accelerator.launch())
"""

from __future__ import annotations

import argparse

import torch

import accel
from accel.testing import build_pipeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("sdxl", "sd3"), default="sdxl", help="which tiny pipeline")
    parser.add_argument("--prompt", default="an astronaut riding a horse")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("-o", "--output", default="tiny-demo.png")
    args = parser.parse_args(argv)

    # Under `accel run` (or torchrun) this joins the launched processes; under plain `python` it starts them.
    pipe = accel.wrap(build_pipeline(args.model), devices=2, accelerator="cpu")
    result = pipe(args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
    acc = pipe.accelerator
    if acc.rank == 0:  # every rank holds the same image; one writes it
        result.images[0].save(args.output)
        print(f"wrote {args.output} in {pipe.last_report.seconds:.2f} s on {acc.world_size} processes")
    acc.teardown()


if __name__ == "__main__":
    main()
