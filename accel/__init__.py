"""accel: hybrid data-pipeline parallelism for conditional diffusion pipelines.

>>> pipe = accel.wrap(pipe, devices=2)      # same call signature as the diffusers pipeline
>>> image = pipe("an astronaut in a jungle").images[0]
>>> pipe = accel.unwrap(pipe)               # the original pipeline
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from accel.version import __version__ as __version__

if TYPE_CHECKING:
    from accel.accelerator import Accelerator, DeviceUnavailableError
    from accel.errors import AccelError
    from accel.runtime.comm import RankMismatchError
    from accel.settings import AccelSettings, ScheduleSettings, SettingsError
    from accel.wrapper import AcceleratedPipeline, CallReport, UnsupportedPipelineError, unwrap


# Public names and the module each lives in. They are imported on first use, so that `import accel`
# (and every `accel` command that needs no pipeline, such as `accel inspect` or `--help`) does not pay
# for importing diffusers and the runtime.
_EXPORTS = {
    "AccelError": "accel.errors",
    "Accelerator": "accel.accelerator",
    "DeviceUnavailableError": "accel.accelerator",
    "RankMismatchError": "accel.runtime.comm",
    "ScheduleSettings": "accel.settings",
    "AccelSettings": "accel.settings",
    "SettingsError": "accel.settings",
    "AcceleratedPipeline": "accel.wrapper",
    "CallReport": "accel.wrapper",
    "UnsupportedPipelineError": "accel.wrapper",
    "unwrap": "accel.wrapper",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'accel' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def wrap(pipe: Any, *, accelerator: Accelerator | str | None = None, **settings: Any) -> AcceleratedPipeline:
    """Accelerate a diffusers pipeline.

    Args:
        pipe: a diffusers pipeline with a ``unet`` or ``transformer``.
        accelerator: an existing, possibly launched :class:`Accelerator`; or the device kind
            (``"auto"``, ``"cpu"``, ``"cuda"``) of a new one made from ``settings``.
        settings: ``devices``, ``strategy``, ``precision``, ``backend``, ``window_guidance``, ``schedule``,
            ``plan``, ... (see :class:`AccelSettings`) for a new Accelerator, which is launched (joining
            torchrun's process group, for example). With an existing Accelerator only the per-pipeline
            settings ``strategy``, ``window_guidance``, ``schedule``, ``plan``, ``backend``, ``engines``,
            ``strict`` and ``compile_vae`` (``accel.settings.PIPELINE_SETTINGS``) may be given.

    Returns:
        A wrapper that is called exactly like ``pipe`` and returns the same output on every rank.
    """
    from accel.accelerator import Accelerator

    if isinstance(accelerator, Accelerator):
        return accelerator.wrap(pipe, **settings)
    if accelerator is not None:
        settings["accelerator"] = accelerator
    return Accelerator(**settings).wrap(pipe)


__all__ = [
    "AccelError",
    "AccelSettings",
    "AcceleratedPipeline",
    "Accelerator",
    "CallReport",
    "DeviceUnavailableError",
    "RankMismatchError",
    "ScheduleSettings",
    "SettingsError",
    "UnsupportedPipelineError",
    "unwrap",
    "wrap",
]
