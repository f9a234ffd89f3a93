"""The tiny offline SDXL pipeline on 2 CPU processes: CFG branches split across them.

python examples/tiny_demo.py
"""

from __future__ import annotations

import torch

import accel
from accel.testing import build_pipeline


def generate(acc: accel.Accelerator) -> float:
    pipe = acc.wrap(build_pipeline("sdxl"))
    image = pipe(
        "an astronaut riding a horse", num_inference_steps=20, generator=torch.Generator().manual_seed(0)
    )
    if acc.rank == 0:
        image.images[0].save("tiny-demo.png")
    return pipe.last_report.seconds


if __name__ == "__main__":
    seconds = accel.Accelerator(devices=2, accelerator="cpu").launch(generate)
    print(f"generated tiny-demo.png in {seconds:.2f} s on 2 processes")
