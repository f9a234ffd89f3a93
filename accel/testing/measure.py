"""Measurement helpers for benchmarks and tests: denoising-loop timing and image-quality metrics."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch


class LoopTimer:
    """Times a pipeline's denoising loop: from the first denoiser call to the end of the last step.

    Pass :meth:`callback` as ``callback_on_step_end``. On CUDA the boundaries are CUDA events (no
    synchronisation during the loop); on the CPU, ``time.perf_counter``.
    """

    def __init__(self, denoiser: torch.nn.Module, device: torch.device | str) -> None:
        self.denoiser = denoiser
        self.cuda = torch.device(device).type == "cuda"
        self._start: Any = None
        self._end: Any = None
        self._handle: Any = None

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self._start is None:
            self._start = self._mark()

    def __enter__(self) -> LoopTimer:
        self._start = self._end = None
        self._handle = self.denoiser.register_forward_pre_hook(self._pre_forward)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def callback(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        self._end = self._mark()
        return kwargs

    @property
    def seconds(self) -> float:
        """The measured loop time (synchronises the device once)."""
        if self._start is None or self._end is None:
            raise RuntimeError("nothing was timed: run the pipeline with callback_on_step_end=timer.callback")
        if self.cuda:
            self._end.synchronize()
            return float(self._start.elapsed_time(self._end)) / 1000.0
        return float(self._end - self._start)


def timed_generate(
    pipe: Any,
    denoiser: torch.nn.Module,
    device: torch.device | str,
    prompt: str,
    *,
    height: int | None,
    width: int | None,
    steps: int,
    guidance: float,
    seed: int,
    output_type: str = "np",
) -> dict[str, Any]:
    """One pipeline call, timed: ``loop_s`` (:class:`LoopTimer`), ``e2e_s`` (host clock around the call,
    device synchronised before and after), ``latents`` (the last step's, fp32 on the CPU), ``images``."""
    timer = LoopTimer(denoiser, device)
    final: dict[str, Any] = {}

    def on_step_end(p: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        timer.callback(p, step, timestep, kwargs)  # marks the loop end before anything else
        if step == steps - 1:
            final["latents"] = kwargs["latents"]
        return kwargs

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with timer:
        images = pipe(
            prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type=output_type,
            callback_on_step_end=on_step_end,
        ).images
    if cuda:
        torch.cuda.synchronize(device)
    return {
        "e2e_s": time.perf_counter() - start,
        "loop_s": timer.seconds,
        "latents": final["latents"].float().cpu(),
        "images": images,
    }


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images (``inf`` when identical)."""
    x = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    y = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
