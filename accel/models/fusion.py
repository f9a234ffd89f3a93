"""Fused attention projections: each attention's q/k/v (cross-attention: k/v; joint attention: also the
added q/k/v) as one matrix product, through diffusers' own ``fuse_qkv_projections``.

Engines built with :attr:`accel.settings.Tuning.fused_qkv` hold the fused graph, so the live denoiser they
serve is fused the same way before they load (:func:`fuse`). The fused weights are copies of the original
projections, which diffusers keeps: :func:`refresh` copies them again after the originals were edited or
replaced, and :func:`unfuse` puts the model back as it was.
"""

from __future__ import annotations

import torch

from accel.errors import AccelError

#: the modules diffusers' ``fuse_projections`` adds beside the original projections
FUSED_MODULES = ("to_qkv", "to_kv", "to_added_qkv")
#: the original projections each fused module is made of, in diffusers' order
_SOURCES = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
#: marks a model that accel fused (and :func:`unfuse` may put back)
_FUSED_BY_ACCEL = "_accel_fused_projections"


class FusionError(AccelError, ValueError):
    """A model whose projections cannot be fused."""


def can_fuse(model: torch.nn.Module) -> bool:
    """True for a diffusers model that offers ``fuse_qkv_projections``."""
    return callable(getattr(model, "fuse_qkv_projections", None))


def is_fused(model: torch.nn.Module) -> bool:
    """True when some attention of ``model`` runs fused projections."""
    return any(getattr(m, "fused_projections", False) for m in model.modules())


def fuse(model: torch.nn.Module) -> bool:
    """Fuse the attention projections of ``model`` in place; False when it was fused already (left as it
    is)."""
    if is_fused(model):
        return False
    if not can_fuse(model):
        raise FusionError(
            f"{type(model).__name__} has no fuse_qkv_projections: engines with fused q/k/v projections apply "
            "to diffusers denoisers that have it (UNet2DConditionModel, SD3Transformer2DModel, ...); export "
            "this model without fused_qkv in --tune."
        )
    try:
        with torch.no_grad():
            model.fuse_qkv_projections()  # type: ignore[operator]  # checked by can_fuse
    except ValueError as exc:  # diffusers refuses some processors (added k/v projections, e.g. IP-Adapter)
        raise FusionError(
            f"{type(model).__name__}.fuse_qkv_projections refused: {exc} Export this model without fused_qkv in --tune."
        ) from None
    setattr(model, _FUSED_BY_ACCEL, True)
    return True


def refresh(model: torch.nn.Module) -> None:
    """Copy the current original projections into the fused ones, in place: the same tensors (compiled
    stages and CUDA graphs bound to them stay valid) and the same version counters (through ``.data``, so
    that watchers of in-place edits see the user's edit, not this copy)."""
    with torch.no_grad():
        for module in model.modules():
            if not getattr(module, "fused_projections", False):
                continue
            for name, sources in _SOURCES.items():
                fused = module._modules.get(name)
                parts = [module._modules.get(s) for s in sources]
                linears = [p for p in parts if isinstance(p, torch.nn.Linear)]
                if not isinstance(fused, torch.nn.Linear) or len(linears) != len(parts):
                    continue
                fused.weight.data.copy_(torch.cat([p.weight for p in linears]))
                if fused.bias is not None:
                    fused.bias.data.copy_(torch.cat([p.bias for p in linears]))


def unfuse(model: torch.nn.Module) -> None:
    """Put a model that :func:`fuse` fused back as it was: its own attention processors, no fused modules."""
    if not getattr(model, _FUSED_BY_ACCEL, False):
        return
    model.unfuse_qkv_projections()  # type: ignore[operator]  # fuse() called fuse_qkv_projections
    for module in model.modules():
        for name in FUSED_MODULES:
            module._modules.pop(name, None)
        if getattr(module, "fused_projections", False):
            setattr(module, "fused_projections", False)  # noqa: B010  (a plain attribute, not a submodule)
    delattr(model, _FUSED_BY_ACCEL)


def is_fused_weight(name: str) -> bool:
    """True for a parameter name inside a fused projection (derived from the original ones)."""
    return any(part in FUSED_MODULES for part in name.split("."))
