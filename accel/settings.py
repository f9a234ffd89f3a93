"""Typed, validated settings shared by the Accelerator, ``wrap`` and plans."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import torch

# Only what this version implements; an unknown value is refused with the valid choices.
Strategy = Literal["cfg"]
AcceleratorKind = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "fp16", "bf16"]
Backend = Literal["eager"]

STRATEGIES: tuple[str, ...] = ("cfg",)
ACCELERATORS: tuple[str, ...] = ("auto", "cpu", "cuda")
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS: tuple[str, ...] = ("eager",)


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the setting and the valid choices."""


def _choice(name: str, value: object, valid: tuple[str, ...] | dict[str, Any]) -> None:
    if value not in valid:
        choices = ", ".join(repr(v) for v in valid)
        raise SettingsError(f"{name}={value!r} is not supported; choose one of {choices}.")


@dataclass(frozen=True, kw_only=True)
class AccelSettings:
    """Everything that decides how a pipeline is accelerated, validated once at construction.

    Attributes:
        devices: processes (one device each) per node.
        num_nodes: nodes taking part; the world size is ``devices * num_nodes``.
        accelerator: ``"cuda"`` (NCCL), ``"cpu"`` (gloo), or ``"auto"`` (CUDA when present).
        strategy: ``"cfg"`` splits the classifier-free-guidance branches across devices (exact).
        precision: cast the pipeline to this dtype on wrap; ``None`` keeps the pipeline's dtype.
        backend: how each stage is compiled.
        collective_timeout_s: a collective that waits longer than this fails instead of hanging.
    """

    devices: int = 1
    num_nodes: int = 1
    accelerator: AcceleratorKind = "auto"
    strategy: Strategy = "cfg"
    precision: Precision | None = None
    backend: Backend = "eager"
    collective_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("devices", "num_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name} must be a positive integer, got {value!r}.")
        _choice("accelerator", self.accelerator, ACCELERATORS)
        _choice("strategy", self.strategy, STRATEGIES)
        if self.precision is not None:
            _choice("precision", self.precision, PRECISIONS)
        _choice("backend", self.backend, BACKENDS)
        if not self.collective_timeout_s > 0:
            raise SettingsError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s!r}.")
        world = self.world_size
        if world > 1 and world % 2:
            raise SettingsError(
                f"world size {world} (devices={self.devices} x num_nodes={self.num_nodes}) is odd: "
                "the two guidance branches need an even number of devices. Use 1, 2 or another even count."
            )

    @property
    def world_size(self) -> int:
        """Total number of processes."""
        return self.devices * self.num_nodes

    @property
    def dtype(self) -> torch.dtype | None:
        """The torch dtype of ``precision`` (``None`` keeps the pipeline's)."""
        return None if self.precision is None else PRECISIONS[self.precision]

    def replace(self, **changes: Any) -> AccelSettings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """A short hash of every field, used to check that all ranks agree."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
