"""Generating a fixed set of digit samples and judging them with the classifier.

A sample is a (seed, digit) pair. Every sample draws its initial noise from its own generator, seeded
from the pair, so a sample's noise does not depend on which other samples share its batch; all samples
of a set run in one batched pipeline call (prompts ordered seed-major, digits 0..9 within a seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from accel.testing.quality.data import DIGITS, digit_prompt, to_grey


@dataclass(frozen=True)
class SampleSet:
    """Which samples to generate: every digit of ``digits`` for every seed of ``seeds``."""

    seeds: tuple[int, ...]
    digits: tuple[int, ...] = DIGITS

    @property
    def labels(self) -> list[int]:
        """The requested digit of each sample, in batch order."""
        return [d for _ in self.seeds for d in self.digits]

    def __len__(self) -> int:
        return len(self.seeds) * len(self.digits)

    def prompts(self) -> list[str]:
        """One prompt per sample, in batch order."""
        return [digit_prompt(d) for d in self.labels]

    def generators(self) -> list[torch.Generator]:
        """One CPU generator per sample, seeded from its (seed, digit) pair."""
        return [
            torch.Generator("cpu").manual_seed(1000 * seed + digit)
            for seed in self.seeds
            for digit in self.digits
        ]


@dataclass(frozen=True)
class Generated:
    """A batched call's output: decoded images ``[N, 8, 8, 3]`` in ``[0, 1]`` and final latents."""

    images: np.ndarray
    latents: torch.Tensor


def generate(pipe: Any, samples: SampleSet, call_kwargs: dict[str, Any], *, steps: int = 50) -> Generated:
    """Run ``pipe`` (plain or wrapped by accel) once on every sample of ``samples``."""
    final: dict[str, torch.Tensor] = {}

    def keep_latents(_pipe: Any, _step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        final["latents"] = kwargs["latents"]
        return kwargs

    output = pipe(
        prompt=samples.prompts(),
        generator=samples.generators(),
        num_inference_steps=steps,
        output_type="np",
        callback_on_step_end=keep_latents,
        **call_kwargs,
    )
    return Generated(images=np.asarray(output.images), latents=final["latents"].detach().clone().cpu())


def classify(classifier: Any, images: np.ndarray) -> list[int]:
    """The digit the classifier reads in each pipeline image (``[N, H, W, 3]`` in ``[0, 1]``)."""
    return [int(v) for v in classifier.predict(to_grey(images))]


def requested_probability(classifier: Any, images: np.ndarray, labels: list[int]) -> list[float]:
    """The classifier's probability of the requested digit, per image: how clearly it reads as asked."""
    probabilities = classifier.probabilities(to_grey(images))
    return [float(p[y]) for p, y in zip(probabilities, labels, strict=True)]


def conditional_accuracy(predicted: list[int], labels: list[int]) -> float:
    """The share of samples classified as the digit their prompt asked for."""
    if len(predicted) != len(labels) or not labels:
        raise ValueError(f"need one prediction per label, got {len(predicted)} for {len(labels)}.")
    return sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)
