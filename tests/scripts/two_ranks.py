"""A worker started by tests/test_failures.py as two independent processes (no launcher)."""

from __future__ import annotations

import logging
import sys

import torch

import accel
from accel.testing import build_pipeline


def main(mode: str) -> None:
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    settings = dict(devices=2, accelerator="cpu", collective_timeout_s=120.0)
    rank = int(__import__("os").environ["RANK"])
    if mode == "mismatch" and rank == 1:
        settings["collective_timeout_s"] = 60.0
    pipe = accel.wrap(build_pipeline("sdxl"), **settings)
    if mode == "fail-rank1" and rank == 0:
        # What a server does before a peer's failure stops this rank: answer its clients with the cause.
        pipe.accelerator.on_peer_failure(lambda message: print(f"before stopping: {message}", flush=True))

    def on_step_end(_pipe, step, timestep, kwargs):
        if mode == "fail-rank1" and rank == 1 and step == 1:
            raise RuntimeError("injected failure on rank 1 at step 1")
        return kwargs

    pipe("a seven", num_inference_steps=6, output_type="latent", callback_on_step_end=on_step_end)
    # A rank that got here while its peer failed would hang in the next collective; say so loudly.
    pipe("a seven", num_inference_steps=6, output_type="latent", callback_on_step_end=on_step_end)


if __name__ == "__main__":
    main(sys.argv[1])
