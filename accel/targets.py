"""What to run: a plan file, a model (folder, hub id, built-in demo) or a script; and loading the model.

``accel run`` (and any other front end) turns its TARGET argument into a :class:`Target` with
:func:`resolve_target`, then loads the model its :class:`~accel.source.ModelSource` names with
:func:`load_pipeline` (the whole pipeline) or :func:`load_components` (the denoiser and VAE only).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from accel.plan import Plan, PlanError, load_plan
from accel.request import RequestError
from accel.source import DEMOS, ModelSource, SourceError
from accel.wrapper import find_denoiser

logger = logging.getLogger(__name__)

#: The pipeline components that can be the denoiser, in the order they are looked for.
DENOISERS = ("unet", "transformer")
#: Image sides above this many times the model's native side are refused: a denoiser's attention and
#: activations grow with the square of the pixel count, far past what a device holds at 4x.
MAX_SIDE_FACTOR = 4


@dataclass(frozen=True)
class ModelGeometry:
    """The image sizes a model serves: sides a multiple of ``multiple`` pixels, at most ``max_side``.

    ``why_max`` says what sets ``max_side`` (the model's position embedding, or memory).
    """

    multiple: int
    native: int
    max_side: int
    why_max: str

    def check(self, name: str, value: int | None) -> None:
        """Refuse ``--height``/``--width`` ``value`` (``name``) that this model cannot serve."""
        if value is None:
            return
        if value % self.multiple:
            lower = value - value % self.multiple
            raise RequestError(
                f"{name} {value} is not a multiple of {self.multiple} (the model's latent pixel size); use "
                f"{lower or self.multiple} or {lower + self.multiple}."
            )
        if value > self.max_side:
            raise RequestError(
                f"{name} {value} is more than this model serves: at most {self.max_side} pixels ({self.why_max})."
            )


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
        source = ModelSource.model(target)
        if source.kind == "folder":
            check_model_folder(Path(source.location))
        return Target("model", source=source)
    except (SourceError, PlanError) as exc:
        raise RequestError(str(exc)) from None


def check_model_folder(folder: Path) -> None:
    """Refuse a pipeline folder whose ``model_index.json`` is unreadable or names a missing component."""
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(
            f"{index_path} is not valid JSON ({exc}): the model folder is damaged; download it again."
        ) from None
    if not isinstance(index, dict):
        raise RequestError(
            f"{index_path} is not a JSON object: the model folder is damaged; download it again."
        )
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or None in entry:
            continue
        sub = folder / name
        if not sub.is_dir():
            raise RequestError(
                f"{folder}: model_index.json lists the component {name!r} ({sub}), which is missing; the "
                "folder is incomplete: download the model again."
            )
        if name in (*DENOISERS, "vae") and not (sub / "config.json").is_file():
            raise RequestError(
                f"{sub} has no config.json; the folder is incomplete: download the model again."
            )


def model_geometry(source: ModelSource) -> ModelGeometry | None:
    """The image sizes ``source``'s model serves, from its configs (``None`` for a hub id not downloaded)."""
    if source.is_builtin:
        from accel.testing.pipelines import pipeline_configs

        configs: dict[str, Any] = dict(pipeline_configs(source.location))
    elif source.kind == "folder":
        folder = Path(source.location)
        configs = {
            name: json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
            for name in (*DENOISERS, "vae")
            if (folder / name / "config.json").is_file()
        }
    else:
        return None
    denoiser = next((configs[name] for name in DENOISERS if name in configs), None)
    if denoiser is None:
        return None
    vae_scale = 2 ** (len(configs.get("vae", {}).get("block_out_channels", [0] * 4)) - 1)
    patch = int(denoiser.get("patch_size") or 1)
    sample = denoiser.get("sample_size") or 128
    native = int(sample[0] if isinstance(sample, list | tuple) else sample) * vae_scale
    embed = denoiser.get("pos_embed_max_size")
    if embed:
        max_side, why = int(embed) * patch * vae_scale, "the size of its position embedding"
    else:
        max_side = MAX_SIDE_FACTOR * native
        why = f"{MAX_SIDE_FACTOR}x its native {native}: larger sizes outgrow device memory"
    return ModelGeometry(vae_scale * patch, native, max_side, why)


def _plan_target(path: Path) -> Target:
    plan = load_plan(path)
    source = ModelSource.from_dict(plan.source)
    if source.kind == "folder" and not (Path(source.location) / "model_index.json").is_file():
        raise RequestError(
            f"the plan {path} was made for the model folder {source.location}, which is not there (no "
            "model_index.json). Move the model back, or make a new plan with `accel plan MODEL_FOLDER ...`."
        )
    if source.kind == "folder":
        check_model_folder(Path(source.location))
    return Target("plan", source=source, plan=plan, plan_path=path)


def load_pipeline(source: ModelSource, *, dtype: Any, device: Any) -> Any:
    """The whole diffusers pipeline ``source`` names (text encoders and VAE included), on ``device``."""
    if source.is_builtin:
        return _builtin_pipeline(source, dtype=dtype, device=device)
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"torch_dtype": dtype} if dtype is not None else {}
    # A component saved as absent (SD3 without its T5 encoder: ``"text_encoder_3": [null, null]``) has to be
    # passed as None, or diffusers refuses the folder as incomplete.
    index = DiffusionPipeline.load_config(source.location)
    kwargs.update({name: None for name, entry in index.items() if _absent(entry)})
    target = torch.device(device)
    if not _reads_onto_gpu(target):
        return DiffusionPipeline.from_pretrained(source.location, **kwargs).to(target)
    # The weights go from the files straight to the GPU (diffusers' device map, through accelerate): no
    # copy of the whole model in host memory first. The map names the current CUDA device, so it is set.
    with torch.cuda.device(target):
        pipe = DiffusionPipeline.from_pretrained(source.location, device_map="cuda", **kwargs)
    return pipe.to(target)  # only what a component kept elsewhere moves


def _absent(entry: Any) -> bool:
    """Whether a ``model_index.json`` entry says the component was saved as None."""
    return isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] is None and entry[1] is None


def _reads_onto_gpu(device: torch.device) -> bool:
    """Whether diffusers can read weights from the files straight onto ``device`` (a GPU, with accelerate)."""
    return device.type == "cuda" and importlib.util.find_spec("accelerate") is not None


def load_denoiser(source: ModelSource, *, dtype: Any, device: str) -> tuple[Any, int]:
    """The denoiser ``source`` names on ``device`` in ``dtype``, and its VAE scale factor.

    For a folder or hub id only the denoiser component (and the VAE config) is loaded, not the text
    encoders: profiling needs nothing else.
    """
    denoiser, scale, _ = load_components(source, dtype=dtype, device=device, vae=False)
    return denoiser, scale


def denoiser_structure(source: ModelSource, *, dtype: Any) -> Any | None:
    """The denoiser of the model folder ``source`` built from its config on the meta device: its graph
    (module tree, parameter shapes and dtypes, stage inputs) without reading a weight. ``None`` where that
    would not be the graph a real load gives (demo and architecture sources are built by code; a model
    that keeps some modules in float32 whatever the dtype); ``ValueError`` as :func:`load_components`."""
    if source.is_builtin:
        return None
    component, cls, _ = _denoiser_class(source.location)
    if getattr(cls, "_keep_in_fp32_modules", None):
        return None
    config = cls.load_config(source.location, subfolder=component)
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
        return model.to(dtype).eval()
    except Exception as exc:  # a model that cannot be built without its data: the caller reads the weights
        logger.debug("%s cannot be built on the meta device (%s); its weights are read", cls.__name__, exc)
        return None


def _denoiser_class(location: str) -> tuple[str, Any, dict[str, Any]]:
    """The denoiser component of the model folder ``location`` (``"unet"`` or ``"transformer"``), its
    diffusers class and the folder's ``model_index.json``; ``ValueError`` when either is missing."""
    import diffusers
    from diffusers import DiffusionPipeline

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
    return component, cls, dict(index)


def load_components(
    source: ModelSource, *, dtype: Any, device: str, vae: bool
) -> tuple[Any, int, Any | None]:
    """:func:`load_denoiser`, plus the pipeline's VAE when ``vae`` (``None`` when it has none)."""
    if source.is_builtin:
        pipe = _builtin_pipeline(source, dtype=dtype, device=device)
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        return find_denoiser(pipe)[1].eval(), scale, getattr(pipe, "vae", None) if vae else None

    import diffusers

    location = source.location
    component, cls, index = _denoiser_class(location)
    target = torch.device(device)
    # As load_pipeline: on a GPU the weights are read straight onto it.
    placed = {"device_map": target} if _reads_onto_gpu(target) else {}
    denoiser = cls.from_pretrained(location, subfolder=component, torch_dtype=dtype, **placed).to(target)
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
    from accel.testing import build_pipeline  # deferred: the demo builders import every model class

    kwargs: dict[str, Any] = {"device": device}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if source.seed is not None:
        kwargs["seed"] = source.seed
    return build_pipeline(source.location, **kwargs)
