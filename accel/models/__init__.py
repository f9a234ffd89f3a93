"""Architecture adapters: a denoiser as an ordered list of units with a segmented forward.

>>> adapter = adapt(pipe.unet)             # or pipe.transformer
>>> state = adapter.prepare(*args, **kwargs)
>>> state = adapter.run(state, 0, 10)      # units [0, 10) on one stage ...
>>> state = adapter.run(state, 10, len(adapter.units))
>>> out = adapter.finish(state)            # == pipe.unet(*args, **kwargs)
"""

from __future__ import annotations

import torch

from accel.models.base import (
    DenoiserAdapter,
    InputShape,
    SegmentState,
    TensorEdge,
    Unit,
    UnsupportedModelError,
)
from accel.models.dit import SD3Adapter, missing_dit_attributes
from accel.models.unet import UNetAdapter, missing_unet_attributes


def adapt(model: torch.nn.Module) -> DenoiserAdapter:
    """The adapter for ``model``, chosen by its structure (never by its name or hub id).

    Raises:
        UnsupportedModelError: ``model`` is neither a ``UNet2DConditionModel``-like U-Net nor an
            ``SD3Transformer2DModel``-like DiT; the message names what each adapter found missing.
    """
    original = getattr(model, "_orig_mod", None)
    if original is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} wraps a compiled module; adapt the original module "
            "(model._orig_mod) and compile per stage instead."
        )
    if hasattr(model, "down_blocks") or hasattr(model, "up_blocks"):
        return UNetAdapter(model)
    if hasattr(model, "transformer_blocks"):
        return SD3Adapter(model)
    raise UnsupportedModelError(
        f"no adapter for {type(model).__name__}: a U-Net needs {', '.join(missing_unet_attributes(model))}; "
        f"a DiT needs {', '.join(missing_dit_attributes(model))}. Supported: UNet2DConditionModel "
        "(SD1.x/2.x/SDXL) and SD3Transformer2DModel (SD3/SD3.5)."
    )


__all__ = [
    "DenoiserAdapter",
    "InputShape",
    "SD3Adapter",
    "SegmentState",
    "TensorEdge",
    "UNetAdapter",
    "Unit",
    "UnsupportedModelError",
    "adapt",
]
