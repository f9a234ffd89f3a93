"""accel: hybrid data-pipeline parallelism for conditional diffusion pipelines.

>>> pipe = accel.wrap(pipe, devices=2)      # same call signature as the diffusers pipeline
>>> image = pipe("an astronaut in a jungle").images[0]
>>> pipe = accel.unwrap(pipe)               # the original pipeline
"""

from __future__ import annotations

from typing import Any

from accel.accelerator import Accelerator, DeviceUnavailableError
from accel.runtime.comm import PeerFailedError, RankMismatchError
from accel.runtime.schedule import ScheduleSettings
from accel.settings import PIPELINE_SETTINGS, AccelSettings, SettingsError
from accel.wrapper import AcceleratedPipeline, CallReport, UnsupportedPipelineError, unwrap

__version__ = "0.1.0"


def wrap(pipe: Any, *, accelerator: Accelerator | str | None = None, **settings: Any) -> AcceleratedPipeline:
    """Accelerate a diffusers pipeline.

    Args:
        pipe: a diffusers pipeline with a ``unet`` or ``transformer``.
        accelerator: an existing, possibly launched :class:`Accelerator`; or the device kind
            (``"auto"``, ``"cpu"``, ``"cuda"``) of a new one made from ``settings``.
        settings: ``devices``, ``strategy``, ``precision``, ``backend``, ``window_guidance``, ``schedule``,
            ``plan``, ... (see :class:`AccelSettings`) for a new Accelerator, which is launched (joining
            torchrun's process group, for example). With an existing Accelerator only the per-pipeline
            settings ``strategy``, ``window_guidance``, ``schedule`` and ``plan`` may be given.

    Returns:
        A wrapper that is called exactly like ``pipe`` and returns the same output on every rank.
    """
    if isinstance(accelerator, Accelerator):
        other = sorted(set(settings) - set(PIPELINE_SETTINGS))
        if other:
            raise SettingsError(
                f"pass settings either to the Accelerator or to wrap(), not both (got {other}); only "
                f"{', '.join(PIPELINE_SETTINGS)} may change per pipeline."
            )
        return accelerator.wrap(pipe, **settings)
    if accelerator is not None:
        settings["accelerator"] = accelerator
    return Accelerator(**settings).wrap(pipe)


__all__ = [
    "AccelSettings",
    "AcceleratedPipeline",
    "Accelerator",
    "CallReport",
    "DeviceUnavailableError",
    "PeerFailedError",
    "RankMismatchError",
    "ScheduleSettings",
    "SettingsError",
    "UnsupportedPipelineError",
    "unwrap",
    "wrap",
]
