"""The keyword arguments of one text-to-image pipeline call, shared by ``accel run`` and ``accel serve``.

Each image gets its own ``torch.Generator`` seeded with that image's seed (diffusers accepts a list of
generators, one per image), so the image for a seed is the same whether it is generated alone or in a
batch, and the same from either command.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def image_generators(seeds: Sequence[int]) -> list[Any]:
    """One CPU generator per image, seeded with its seed (CPU, so an image does not depend on the device
    its noise is drawn for)."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def call_arguments(
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    negative_prompts: Sequence[str] | None = None,
    height: int | None = None,
    width: int | None = None,
) -> dict[str, Any]:
    """The pipeline call for ``prompts[i]`` generated from ``seeds[i]``.

    ``negative_prompts`` (one per prompt) is passed only when given: diffusers treats a missing negative
    prompt differently from an empty one, so the two must not be mixed in one call.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompt(s) need as many seeds, got {len(seeds)}.")
    call: dict[str, Any] = dict(
        prompt=list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=image_generators(seeds),
    )
    if negative_prompts is not None:
        if len(negative_prompts) != len(prompts):
            raise ValueError(
                f"{len(prompts)} prompt(s) need as many negative prompts, got {len(negative_prompts)}."
            )
        call["negative_prompt"] = list(negative_prompts)
    if height is not None:
        call["height"] = height
    if width is not None:
        call["width"] = width
    return call
