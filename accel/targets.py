"""What to run: a plan file, a model (folder, hub id, built-in demo) or a script; and loading the model.

``accel run`` (and any other front end) turns its TARGET argument into a :class:`Target` with
:func:`resolve_target`, then loads the model its :class:`~accel.source.ModelSource` names with
:func:`load_pipeline` (the whole pipeline) or :func:`load_components` (the denoiser and VAE only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from accel.plan import Plan, PlanError, load_plan
from accel.request import RequestError
from accel.source import DEMOS, ModelSource, SourceError
from accel.testing import build_pipeline
from accel.wrapper import find_denoiser

#: The pipeline components that can be the denoiser, in the order they are looked for.
DENOISERS = ("unet", "transformer")


@dataclass(frozen=True)
class Target:
    """What to run: a ``"script"``, a ``"plan"`` (with the model source it names) or a ``"model"``."""

    kind: Literal["script", "plan", "model"]
    script: Path | None = None
    source: ModelSource | None = None
    plan: Plan | None = None
    plan_path: Path | None = None

    @property
    def label(self) -> str:
        """How messages and reports name the target."""
        if self.script is not None:
            return str(self.script)
        if self.plan_path is not None:
            return str(self.plan_path)
        assert self.source is not None
        return self.source.location


def resolve_target(target: str | None, demo: str | None) -> Target:
    """Classify TARGET / ``--demo``; :class:`RequestError` when it is missing, ambiguous or unusable."""
    if (target is None) == (demo is None):
        raise RequestError(
            "give either a TARGET (a plan file, a diffusers model folder or a script.py) or --demo "
            f"{'|'.join(DEMOS)}, not both and not neither."
        )
    try:
        if demo is not None:
            return Target("model", source=ModelSource.demo(demo))
        assert target is not None
        path = Path(target)
        if path.suffix == ".py":
            if not path.is_file():
                raise RequestError(f"{target}: no such script.")
            return Target("script", script=path)
        if path.suffix == ".json":
            return _plan_target(path)
        return Target("model", source=ModelSource.model(target))
    except (SourceError, PlanError) as exc:
        raise RequestError(str(exc)) from None


def _plan_target(path: Path) -> Target:
    plan = load_plan(path)
    source = ModelSource.from_dict(plan.source)
    if source.kind == "folder" and not (Path(source.location) / "model_index.json").is_file():
        raise RequestError(
            f"the plan {path} was made for the model folder {source.location}, which is not there (no "
            "model_index.json). Move the model back, or make a new plan with `accel plan MODEL_FOLDER ...`."
        )
    return Target("plan", source=source, plan=plan, plan_path=path)


def load_pipeline(source: ModelSource, *, dtype: Any, device: Any) -> Any:
    """The whole diffusers pipeline ``source`` names (text encoders and VAE included)."""
    if source.is_builtin:
        return _builtin_pipeline(source, dtype=dtype, device=device)
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    return DiffusionPipeline.from_pretrained(source.location, **kwargs)


def load_denoiser(source: ModelSource, *, dtype: Any, device: str) -> tuple[Any, int]:
    """The denoiser ``source`` names on ``device`` in ``dtype``, and its VAE scale factor.

    For a folder or hub id only the denoiser component (and the VAE config) is loaded, not the text
    encoders: profiling needs nothing else.
    """
    denoiser, scale, _ = load_components(source, dtype=dtype, device=device, vae=False)
    return denoiser, scale


def load_components(
    source: ModelSource, *, dtype: Any, device: str, vae: bool
) -> tuple[Any, int, Any | None]:
    """:func:`load_denoiser`, plus the pipeline's VAE when ``vae`` (``None`` when it has none)."""
    if source.is_builtin:
        pipe = _builtin_pipeline(source, dtype=dtype, device=device)
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        return find_denoiser(pipe)[1].eval(), scale, getattr(pipe, "vae", None) if vae else None

    import diffusers
    from diffusers import DiffusionPipeline

    location = source.location
    index = DiffusionPipeline.load_config(location)
    component = next((name for name in DENOISERS if isinstance(index.get(name), list | tuple)), None)
    if component is None:
        raise ValueError(f"{location}: model_index.json names no 'unet' or 'transformer' component.")
    class_name = index[component][1]
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(
            f"{location}: the {component} class {class_name!r} is not in diffusers {diffusers.__version__}."
        )
    denoiser = cls.from_pretrained(location, subfolder=component, torch_dtype=dtype).to(device)
    vae_scale_factor = 8
    decoder_vae = None
    if isinstance(index.get("vae"), list | tuple):
        vae_config = diffusers.AutoencoderKL.load_config(location, subfolder="vae")
        vae_scale_factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
        if vae:
            decoder_vae = (
                diffusers.AutoencoderKL.from_pretrained(location, subfolder="vae", torch_dtype=dtype)
                .to(device)
                .eval()
            )
    return denoiser.eval(), vae_scale_factor, decoder_vae


def _builtin_pipeline(source: ModelSource, *, dtype: Any, device: Any) -> Any:
    """The tiny demo or full-size random-weight pipeline a ``demo``/``arch`` source names."""
    kwargs: dict[str, Any] = {"device": device}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if source.seed is not None:
        kwargs["seed"] = source.seed
    return build_pipeline(source.location, **kwargs)
