"""``wrap``/``unwrap``: attach accel to a diffusers pipeline without changing the user's code.

The wrapper delegates every attribute to the original pipeline and keeps its call signature. The
only change to the pipeline itself is a removable diffusers hook on the denoiser (``pipe.unet`` or
``pipe.transformer``); :func:`unwrap` removes it and returns the original object.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry

from accel.runtime.guidance import HOOK_NAME, CFGSplitHook

if TYPE_CHECKING:
    from accel.accelerator import Accelerator

log = logging.getLogger(__name__)

DENOISER_ATTRIBUTES = ("unet", "transformer")


class UnsupportedPipelineError(TypeError):
    """The object is not a diffusers pipeline with a denoiser accel can split."""


@dataclass(frozen=True)
class CallReport:
    """What one pipeline call did, for logging and for ``pipe.last_report``."""

    rank: int
    world_size: int
    denoiser_calls: int
    split_calls: int
    collectives: int
    bytes_sent: int
    seconds: float


def find_denoiser(pipe: Any) -> tuple[str, torch.nn.Module]:
    """The denoiser of a diffusers pipeline and its attribute name."""
    for name in DENOISER_ATTRIBUTES:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    components = sorted(getattr(pipe, "components", {}) or {})
    raise UnsupportedPipelineError(
        f"{type(pipe).__name__} has no denoiser accel can split: expected a torch module at "
        f"`pipe.unet` or `pipe.transformer` (components: {components or 'none'}). "
        "Pass a diffusers pipeline such as StableDiffusionXLPipeline or StableDiffusion3Pipeline."
    )


def model_fingerprint(model: torch.nn.Module) -> str:
    """Class, architecture config and weights sample of a model, to check that all ranks loaded the same one."""
    from accel.plan import config_hash, weights_fingerprint

    return f"{type(model).__name__}/{config_hash(model)}/{weights_fingerprint(model)}"


class AcceleratedPipeline:
    """A diffusers pipeline accelerated by accel: call it exactly like the original.

    Attributes read or written on the wrapper go to the original pipeline. ``last_report`` holds the
    :class:`CallReport` of the latest call; ``pipeline`` is the original object.
    """

    def __init__(
        self, pipe: Any, accelerator: Accelerator, hook: CFGSplitHook | None, restore: _Restore
    ) -> None:
        object.__setattr__(self, "_pipe", pipe)
        object.__setattr__(self, "_accelerator", accelerator)
        object.__setattr__(self, "_hook", hook)
        object.__setattr__(self, "_restore", restore)
        object.__setattr__(self, "last_report", None)

    @property
    def pipeline(self) -> Any:
        """The original diffusers pipeline."""
        return self._pipe

    @property
    def accelerator(self) -> Accelerator:
        """The Accelerator this pipeline runs on."""
        return self._accelerator

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        pipe = object.__getattribute__(self, "_pipe")
        if pipe is None:
            raise RuntimeError("this accelerated pipeline was unwrapped; use the object unwrap() returned.")
        return getattr(pipe, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "last_report":
            object.__setattr__(self, name, value)
        else:
            setattr(self._pipe, name, value)

    def to(self, *args: Any, **kwargs: Any) -> AcceleratedPipeline:
        """Move/cast the original pipeline; returns the wrapper."""
        self._pipe.to(*args, **kwargs)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self._pipe
        if pipe is None:
            raise RuntimeError("this accelerated pipeline was unwrapped; use the object unwrap() returned.")
        acc = self._accelerator
        comm = acc.comm
        if comm is not None and kwargs.get("generator") is None and kwargs.get("latents") is None:
            # Ranks must draw the same initial noise or they diverge: agree on one seed per call.
            seed = comm.broadcast_int(int(torch.randint(0, 2**62, ()).item()) if acc.rank == 0 else 0)
            kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
        hook = self._hook
        if hook is not None:
            hook.reset_state(hook_module(pipe))
        if comm is not None:
            comm.stats.reset()
        start = time.perf_counter()
        try:
            output = pipe(*args, **kwargs)
        except BaseException as exc:
            acc.report_failure(exc)
            raise
        report = CallReport(
            rank=acc.rank,
            world_size=acc.world_size,
            denoiser_calls=hook.calls if hook is not None else 0,
            split_calls=hook.split_calls if hook is not None else 0,
            collectives=comm.stats.collectives if comm is not None else 0,
            bytes_sent=comm.stats.bytes_sent if comm is not None else 0,
            seconds=time.perf_counter() - start,
        )
        self.last_report = report
        log.info(
            "rank %d: %d denoiser calls (%d split), %d collectives, %.1f KiB sent, %.3f s",
            report.rank,
            report.denoiser_calls,
            report.split_calls,
            report.collectives,
            report.bytes_sent / 1024,
            report.seconds,
        )
        return output

    def __repr__(self) -> str:
        return f"AcceleratedPipeline({type(self._pipe).__name__}, {self._accelerator!r})"


def hook_module(pipe: Any) -> torch.nn.Module:
    return find_denoiser(pipe)[1]


@dataclass
class _Restore:
    """What wrapping changed on the denoiser, so that unwrapping can put it back exactly."""

    module: torch.nn.Module
    had_registry: bool
    had_forward_attr: bool


def wrap_pipeline(pipe: Any, accelerator: Accelerator) -> AcceleratedPipeline:
    """Attach accel to ``pipe`` (see :func:`accel.wrap`)."""
    if isinstance(pipe, AcceleratedPipeline):
        raise ValueError("this pipeline is already wrapped by accel; call accel.unwrap(pipe) first.")
    _, denoiser = find_denoiser(pipe)
    registry_before = getattr(denoiser, "_diffusers_hook", None)
    if registry_before is not None and registry_before.get_hook(HOOK_NAME) is not None:
        raise ValueError("the denoiser already carries an accel hook; call accel.unwrap(pipe) first.")
    dtype = accelerator.settings.dtype
    if dtype is None:
        pipe.to(accelerator.device)
    else:
        pipe.to(accelerator.device, dtype)
    comm = accelerator.comm
    if comm is not None:
        comm.check_same("the denoiser (class, config, weights)", model_fingerprint(denoiser))
    restore = _Restore(
        module=denoiser,
        had_registry=registry_before is not None,
        had_forward_attr="forward" in vars(denoiser),
    )
    hook = None
    if comm is not None:
        hook = CFGSplitHook(
            comm, owns_result=lambda: bool(getattr(pipe, "do_classifier_free_guidance", False))
        )
        HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(hook, HOOK_NAME)
    return AcceleratedPipeline(pipe, accelerator, hook, restore)


def unwrap(pipe: Any) -> Any:
    """Remove accel from a wrapped pipeline and return the original pipeline object.

    The denoiser's ``forward`` and hook registry are put back exactly as they were; the pipeline stays
    on the device it was moved to. Anything that is not an accelerated pipeline is returned unchanged.
    """
    if not isinstance(pipe, AcceleratedPipeline):
        return pipe
    original = pipe._pipe
    restore: _Restore = pipe._restore
    module = restore.module
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
        if not restore.had_registry and not registry.hooks:
            del module._diffusers_hook
        if not restore.had_forward_attr and "forward" in vars(module):
            del module.forward
    object.__setattr__(pipe, "_pipe", None)
    return original
