"""Random-weight SDXL / SD3 pipelines: tiny ones for CPU tests, full-size ones for GPU benchmarks.

No pretrained diffusion weights can be downloaded on the project's machines, so every pipeline here is
built from a configuration in code (tiny) or from the public architecture configs shipped in
``accel/testing/configs`` (full size), with deterministic random weights: the same ``seed`` gives
bit-identical weights (on the same device), and the caller's RNG state is left untouched.

>>> pipe = build_pipeline("sdxl")                     # ~2 M-parameter U-Net, 128x128 images, on CPU
>>> image = pipe("a cat", num_inference_steps=4).images[0]
>>> pipe = full_size_pipeline("sd3", device="cuda")  # 2 B-parameter transformer, fp16, random weights
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import resources
from typing import Any

import diffusers
import torch
import transformers
from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline
from torch import nn

from accel.testing.tokenizers import clip_tokenizer, clip_vocab_size, has_real_clip_vocab, t5_tokenizer

logger = logging.getLogger(__name__)

ComponentConfigs = dict[str, dict[str, Any]]
Overrides = Mapping[str, Mapping[str, Any]]

FAMILIES: tuple[str, ...] = ("sdxl", "sd3")
"""Pipeline families accepted by :func:`full_size_pipeline`."""

_FULL_SIZE_CONFIGS: dict[str, str] = {"sdxl": "sdxl-base-1.0.json", "sd3": "sd3-medium.json"}

# Components of each family, in build order (which is also the order their seeds are derived in).
_SDXL_COMPONENTS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "unet", "vae", "scheduler")
_SD3_COMPONENTS: tuple[str, ...] = (
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "transformer",
    "vae",
    "scheduler",
)

# --------------------------------------------------------------------------------------------------------
# Tiny configurations. The U-Net keeps SDXL's topology (a plain down block, then two cross-attention down
# blocks, a cross-attention mid block, mirrored up blocks with skip connections, text-time conditioning);
# the SD3 transformer keeps SD3's (joint MMDiT blocks, the last one context-pre-only). Default image size
# is 128x128 (latent 16x16, VAE downsampling 8).
# --------------------------------------------------------------------------------------------------------
_TINY_CLIP_HIDDEN = 32
_TINY_CLIP_PROJECTION = 32
_TINY_T5_D_MODEL = 2 * _TINY_CLIP_HIDDEN
_TINY_ADD_TIME_DIM = 8


def _tiny_clip_config(class_name: str, hidden_act: str) -> dict[str, Any]:
    return {
        "_class_name": class_name,
        "hidden_size": _TINY_CLIP_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": hidden_act,
        "projection_dim": _TINY_CLIP_PROJECTION,
        "layer_norm_eps": 1e-5,
    }


def _tiny_vae_config(latent_channels: int, **extra: Any) -> dict[str, Any]:
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": latent_channels,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "act_fn": "silu",
        "sample_size": 128,
        "force_upcast": False,
        **extra,
    }


def _tiny_sdxl_configs() -> ComponentConfigs:
    return {
        "text_encoder": _tiny_clip_config("CLIPTextModel", "quick_gelu"),
        "text_encoder_2": _tiny_clip_config("CLIPTextModelWithProjection", "gelu"),
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": [32, 48, 64],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            # diffusers' historical naming: for this U-Net "attention_head_dim" is the number of heads.
            "attention_head_dim": [2, 4, 4],
            "transformer_layers_per_block": [1, 1, 1],
            "use_linear_projection": True,
            "norm_num_groups": 16,
            "cross_attention_dim": 2 * _TINY_CLIP_HIDDEN,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _TINY_ADD_TIME_DIM,
            "projection_class_embeddings_input_dim": 6 * _TINY_ADD_TIME_DIM + _TINY_CLIP_PROJECTION,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
        },
        "vae": _tiny_vae_config(4, scaling_factor=0.13025),
        "scheduler": {
            "_class_name": "EulerDiscreteScheduler",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "prediction_type": "epsilon",
        },
    }


def _tiny_sd3_configs() -> ComponentConfigs:
    return {
        "text_encoder": _tiny_clip_config("CLIPTextModelWithProjection", "quick_gelu"),
        "text_encoder_2": _tiny_clip_config("CLIPTextModelWithProjection", "gelu"),
        "text_encoder_3": {
            "_class_name": "T5EncoderModel",
            "d_model": _TINY_T5_D_MODEL,
            "d_kv": 8,
            "d_ff": 128,
            "num_layers": 2,
            "num_heads": 8,
            "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 32,
            "feed_forward_proj": "gated-gelu",
        },
        "transformer": {
            "_class_name": "SD3Transformer2DModel",
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 6,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "caption_projection_dim": 32,
            "joint_attention_dim": _TINY_T5_D_MODEL,
            "pooled_projection_dim": 2 * _TINY_CLIP_PROJECTION,
            "pos_embed_max_size": 32,
        },
        "vae": _tiny_vae_config(
            16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
        ),
        "scheduler": {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": 1000,
            "shift": 3.0,
        },
    }


# --------------------------------------------------------------------------------------------------------
# Building components
# --------------------------------------------------------------------------------------------------------
def _component_seed(seed: int, name: str) -> int:
    """A per-component seed, so each component's weights depend only on ``seed`` and its own config."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """Fork the CPU RNG and, for an accelerator device, every device's RNG of that type."""
    devices: list[int] = []
    device_type = device.type
    if device_type not in ("cpu", "meta"):
        backend = getattr(torch, device_type, None)
        count = backend.device_count() if backend is not None and hasattr(backend, "device_count") else 0
        devices = list(range(count))
    else:
        device_type = "cuda"  # fork_rng's default type; with no devices only the CPU RNG is forked
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        yield


def _config_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in config.items() if not k.startswith("_")}


def _is_transformers_class(class_name: str) -> bool:
    return class_name in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


def _component_class(class_name: str) -> Any:
    module = transformers if _is_transformers_class(class_name) else diffusers
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"unknown component class {class_name!r} in a pipeline config")
    return cls


def _build_component(config: Mapping[str, Any]) -> Any:
    """Instantiate one component (model or scheduler) from its config dict, on the current device."""
    class_name = str(config["_class_name"])
    cls = _component_class(class_name)
    kwargs = _config_kwargs(config)
    if _is_transformers_class(class_name):
        return cls(cls.config_class(**kwargs))
    return cls.from_config(kwargs)


def _valid_keys(config: Mapping[str, Any]) -> set[str]:
    """Config keys a component class accepts (used to reject misspelt overrides)."""
    class_name = str(config["_class_name"])
    cls = _component_class(class_name)
    if _is_transformers_class(class_name):
        return set(cls.config_class().to_dict())
    return {name for name in inspect.signature(cls.__init__).parameters if name != "self"}


def _apply_overrides(configs: ComponentConfigs, overrides: Overrides | None) -> ComponentConfigs:
    merged = copy.deepcopy(configs)
    for component, patch in (overrides or {}).items():
        if component not in merged:
            valid = ", ".join(sorted(merged))
            raise ValueError(f"overrides: unknown component {component!r}; valid components: {valid}")
        unknown = sorted(set(patch) - _valid_keys(merged[component]))
        if unknown:
            raise ValueError(
                f"overrides[{component!r}]: {unknown} are not config entries of "
                f"{merged[component]['_class_name']}"
            )
        merged[component].update(copy.deepcopy(dict(patch)))
    return merged


def _cast(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move and cast like ``from_pretrained(torch_dtype=...)`` would (fp16 keeps ``_keep_in_fp32_modules``).

    ``nn.Module.to`` is called directly: diffusers 0.42's ``ModelMixin.to`` warns about float32 modules on
    every dtype cast, even when the model has none.
    """
    nn.Module.to(module, device=device, dtype=dtype)
    keep_fp32 = getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype == torch.float16 and keep_fp32:
        for name, submodule in module.named_modules():
            if any(part in keep_fp32 for part in name.split(".")):
                nn.Module.to(submodule, dtype=torch.float32)


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------------
# Consistency checks: turn a mismatched override into a clear error instead of a shape error mid-call.
# --------------------------------------------------------------------------------------------------------
def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"inconsistent pipeline config: {message}")


def _check_text_encoders(configs: ComponentConfigs, names: tuple[str, ...], tokenizer_size: int) -> None:
    for name in names:
        vocab_size = int(configs[name]["vocab_size"])
        _check(
            vocab_size >= tokenizer_size,
            f"{name}.vocab_size={vocab_size} is smaller than its tokenizer ({tokenizer_size} tokens)",
        )


def _check_sdxl(configs: ComponentConfigs) -> None:
    unet, te1, te2, vae = (configs[k] for k in ("unet", "text_encoder", "text_encoder_2", "vae"))
    hidden = int(te1["hidden_size"]) + int(te2["hidden_size"])
    _check(
        unet["cross_attention_dim"] == hidden,
        f"unet.cross_attention_dim={unet['cross_attention_dim']} must equal "
        f"text_encoder.hidden_size + text_encoder_2.hidden_size = {hidden}",
    )
    add_dim = 6 * int(unet["addition_time_embed_dim"]) + int(te2["projection_dim"])
    _check(
        unet["projection_class_embeddings_input_dim"] == add_dim,
        f"unet.projection_class_embeddings_input_dim={unet['projection_class_embeddings_input_dim']} must "
        f"equal 6 * unet.addition_time_embed_dim + text_encoder_2.projection_dim = {add_dim}",
    )
    _check(
        unet["in_channels"] == vae["latent_channels"] == unet["out_channels"],
        f"unet.in_channels/out_channels ({unet['in_channels']}/{unet['out_channels']}) must equal "
        f"vae.latent_channels={vae['latent_channels']}",
    )


def _check_sd3(configs: ComponentConfigs, with_t5: bool) -> None:
    transformer, te1, te2, vae = (
        configs[k] for k in ("transformer", "text_encoder", "text_encoder_2", "vae")
    )
    pooled = int(te1["projection_dim"]) + int(te2["projection_dim"])
    _check(
        transformer["pooled_projection_dim"] == pooled,
        f"transformer.pooled_projection_dim={transformer['pooled_projection_dim']} must equal "
        f"text_encoder.projection_dim + text_encoder_2.projection_dim = {pooled}",
    )
    hidden = int(te1["hidden_size"]) + int(te2["hidden_size"])
    joint = int(transformer["joint_attention_dim"])
    _check(
        joint >= hidden,
        f"transformer.joint_attention_dim={joint} must be >= the CLIP hidden sizes' sum {hidden}",
    )
    if with_t5:
        d_model = int(configs["text_encoder_3"]["d_model"])
        _check(
            joint == d_model,
            f"transformer.joint_attention_dim={joint} must equal text_encoder_3.d_model={d_model}",
        )
    _check(
        transformer["in_channels"] == vae["latent_channels"] == transformer["out_channels"],
        f"transformer.in_channels/out_channels must equal vae.latent_channels={vae['latent_channels']}",
    )


# --------------------------------------------------------------------------------------------------------
# Assembling pipelines
# --------------------------------------------------------------------------------------------------------
def _build_models(
    configs: ComponentConfigs,
    names: tuple[str, ...],
    *,
    seed: int,
    build_device: torch.device,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """Build the named components under a forked RNG, each seeded from ``seed`` and its name.

    Models are constructed on ``build_device`` (the target device for full-size models, so that their
    random initialisation runs there), then moved to ``device`` / ``dtype`` and put in eval mode.
    """
    components: dict[str, Any] = {}
    with _forked_rng(build_device):
        for name in names:
            if name not in configs:
                components[name] = None
                continue
            torch.manual_seed(_component_seed(seed, name))
            start = time.perf_counter()
            if str(configs[name]["_class_name"]).endswith("Scheduler"):
                component = _build_component(configs[name])  # schedulers keep their tables on the CPU
            else:
                with build_device:
                    component = _build_component(configs[name])
            if isinstance(component, nn.Module):
                _cast(component, device, dtype)
                component.eval()
                logger.debug(
                    "built %s (%s): %.1f M parameters in %.2f s",
                    name,
                    type(component).__name__,
                    _num_params(component) / 1e6,
                    time.perf_counter() - start,
                )
            components[name] = component
    return components


def _text_encoder_configs(configs: ComponentConfigs, names: tuple[str, ...], tokenizer: Any) -> None:
    """Point the CLIP encoders' special-token ids (the pooled output reads the EOS position) at the tokenizer."""
    for name in names:
        configs[name].update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


def _assemble_sdxl(
    configs: ComponentConfigs,
    *,
    seed: int,
    build_device: torch.device,
    device: torch.device,
    dtype: torch.dtype,
) -> StableDiffusionXLPipeline:
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    _text_encoder_configs(configs, ("text_encoder", "text_encoder_2"), tokenizer)
    _check_text_encoders(configs, ("text_encoder", "text_encoder_2"), len(tokenizer))
    _check_sdxl(configs)
    parts = _build_models(
        configs, _SDXL_COMPONENTS, seed=seed, build_device=build_device, device=device, dtype=dtype
    )
    return StableDiffusionXLPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        add_watermarker=False,
    )


def _assemble_sd3(
    configs: ComponentConfigs,
    *,
    seed: int,
    with_t5: bool,
    build_device: torch.device,
    device: torch.device,
    dtype: torch.dtype,
) -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    tokenizer_3 = t5_tokenizer() if with_t5 else None
    _text_encoder_configs(configs, ("text_encoder", "text_encoder_2"), tokenizer)
    _check_text_encoders(configs, ("text_encoder", "text_encoder_2"), len(tokenizer))
    if with_t5 and tokenizer_3 is not None:
        _check_text_encoders(configs, ("text_encoder_3",), len(tokenizer_3))
    else:
        configs.pop("text_encoder_3", None)
    _check_sd3(configs, with_t5)
    parts = _build_models(
        configs, _SD3_COMPONENTS, seed=seed, build_device=build_device, device=device, dtype=dtype
    )
    return StableDiffusion3Pipeline(
        transformer=parts["transformer"],
        scheduler=parts["scheduler"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=tokenizer,
        text_encoder_2=parts["text_encoder_2"],
        tokenizer_2=tokenizer_2,
        text_encoder_3=parts["text_encoder_3"],
        tokenizer_3=tokenizer_3,
    )


def _log_built(kind: str, pipe: Any, denoiser: str, start: float) -> None:
    logger.info(
        "built %s %s: %s %.2f M parameters, %d parameters in all, in %.2f s (%s CLIP vocabulary)",
        kind,
        type(pipe).__name__,
        denoiser,
        _num_params(getattr(pipe, denoiser)) / 1e6,
        sum(_num_params(m) for m in pipe.components.values() if isinstance(m, nn.Module)),
        time.perf_counter() - start,
        "real" if has_real_clip_vocab() else "byte-level fallback",
    )


def _tiny_text_encoders(configs: ComponentConfigs, names: tuple[str, ...]) -> None:
    vocab_size = clip_vocab_size()
    for name in names:
        configs[name]["vocab_size"] = vocab_size


def tiny_sdxl_pipeline(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StableDiffusionXLPipeline:
    """A tiny random-weight SDXL pipeline (real diffusers classes, ~2 M-parameter U-Net), built offline.

    The U-Net has SDXL's topology (three down blocks, two with cross-attention, a cross-attention mid
    block, mirrored up blocks, text-time conditioning); default images are 128x128. Weights are built on
    the CPU in fp32 from ``seed`` (so they are identical across devices), then moved to ``device`` and
    ``dtype``; the caller's RNG state is not changed. Every component is in eval mode.
    """
    start = time.perf_counter()
    configs = _tiny_sdxl_configs()
    _tiny_text_encoders(configs, ("text_encoder", "text_encoder_2"))
    pipe = _assemble_sdxl(
        configs, seed=seed, build_device=torch.device("cpu"), device=torch.device(device), dtype=dtype
    )
    _log_built("tiny", pipe, "unet", start)
    return pipe


def tiny_sd3_pipeline(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_t5: bool = True,
) -> StableDiffusion3Pipeline:
    """A tiny random-weight SD3 pipeline (real diffusers classes, 6 joint transformer blocks), built offline.

    Default images are 128x128. ``with_t5=False`` leaves out the third text encoder (``text_encoder_3``
    and ``tokenizer_3`` are ``None``; the pipeline then feeds zeros in its place, as SD3 allows). Weights
    are built on the CPU in fp32 from ``seed``, then moved to ``device`` and ``dtype``; the caller's RNG
    state is not changed. Every component is in eval mode.
    """
    start = time.perf_counter()
    configs = _tiny_sd3_configs()
    _tiny_text_encoders(configs, ("text_encoder", "text_encoder_2"))
    configs["text_encoder_3"]["vocab_size"] = len(t5_tokenizer())
    pipe = _assemble_sd3(
        configs,
        seed=seed,
        with_t5=with_t5,
        build_device=torch.device("cpu"),
        device=torch.device(device),
        dtype=dtype,
    )
    _log_built("tiny", pipe, "transformer", start)
    return pipe


def tiny_text_components(family: str, *, seed: int = 0, max_length: int = 77) -> dict[str, Any]:
    """The two CLIP tokenizers and text encoders of the tiny ``family`` pipeline ("sdxl" or "sd3").

    The encoders have the weights :func:`tiny_sdxl_pipeline` / :func:`tiny_sd3_pipeline` build for the
    same ``seed`` (fp32, CPU, eval mode). ``max_length`` is the tokenizers' ``model_max_length`` (the
    length every prompt is padded to); the encoders accept up to 77 positions.

    Returns:
        ``{"tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"}``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    names = ("text_encoder", "text_encoder_2")
    configs = _tiny_sdxl_configs() if family == "sdxl" else _tiny_sd3_configs()
    configs = {name: configs[name] for name in names}
    _tiny_text_encoders(configs, names)
    tokenizer, tokenizer_2 = clip_tokenizer(max_length), clip_tokenizer(max_length)
    _text_encoder_configs(configs, names, tokenizer)
    _check_text_encoders(configs, names, len(tokenizer))
    cpu = torch.device("cpu")
    parts = _build_models(configs, names, seed=seed, build_device=cpu, device=cpu, dtype=torch.float32)
    return {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2, **parts}


def full_size_config(family: str) -> ComponentConfigs:
    """The full-size architecture configs of ``family`` ("sdxl" or "sd3"), per component, as shipped."""
    if family not in _FULL_SIZE_CONFIGS:
        raise ValueError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    text = resources.files("accel.testing").joinpath("configs", _FULL_SIZE_CONFIGS[family]).read_text()
    raw = json.loads(text)
    return {name: value for name, value in raw.items() if isinstance(value, dict)}


def full_size_pipeline(
    family: str,
    *,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cuda",
    seed: int = 0,
    with_t5: bool = False,
    overrides: Overrides | None = None,
) -> StableDiffusionXLPipeline | StableDiffusion3Pipeline:
    """A full-size SDXL-base-1.0 or SD3-medium architecture with random weights, for speed benchmarks.

    Modules are constructed directly on ``device`` (their random initialisation runs there, which takes
    seconds on a GPU instead of minutes on a CPU), then cast to ``dtype``. The tokenizers use the real
    CLIP vocabulary when ``open-clip-torch`` is installed (a warning is logged otherwise).

    Args:
        family: "sdxl" or "sd3".
        dtype: parameter dtype of every model.
        device: where the models are built and live.
        seed: weights seed; the caller's RNG state is not changed.
        with_t5: SD3 only: include the 4.7 B-parameter T5-XXL encoder (otherwise ``text_encoder_3=None``).
        overrides: per-component config patches, e.g. ``{"unet": {"block_out_channels": [32, 64, 64]}}``
            (for tests that need a small model of the same construction path). Unknown components or
            config keys, and patches that make the components' dimensions disagree, raise ``ValueError``.
    """
    start = time.perf_counter()
    configs = _apply_overrides(full_size_config(family), overrides)
    if not has_real_clip_vocab():
        logger.warning(
            "open-clip-torch is not installed: the full-size %s pipeline uses a byte-level CLIP vocabulary "
            "(install it with `pip install --no-deps open-clip-torch` for the real one)",
            family,
        )
    target = torch.device(device)
    pipe: StableDiffusionXLPipeline | StableDiffusion3Pipeline
    if family == "sdxl":
        pipe = _assemble_sdxl(configs, seed=seed, build_device=target, device=target, dtype=dtype)
        _log_built("full-size", pipe, "unet", start)
    else:
        pipe = _assemble_sd3(
            configs, seed=seed, with_t5=with_t5, build_device=target, device=target, dtype=dtype
        )
        _log_built("full-size", pipe, "transformer", start)
    return pipe


_BUILDERS: dict[str, Callable[..., Any]] = {
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "sdxl-base-1.0": lambda **kw: full_size_pipeline("sdxl", **kw),
    "sd3-medium": lambda **kw: full_size_pipeline("sd3", **kw),
}
PIPELINE_NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""Names accepted by :func:`build_pipeline`: tiny "sdxl"/"sd3", full-size "sdxl-base-1.0"/"sd3-medium"."""


def pipeline_configs(spec: str) -> ComponentConfigs:
    """The component configs :func:`build_pipeline` builds ``spec`` from (no weights are made)."""
    tiny = {"sdxl": _tiny_sdxl_configs, "sd3": _tiny_sd3_configs}
    if spec in tiny:
        return tiny[spec]()
    full = {"sdxl-base-1.0": "sdxl", "sd3-medium": "sd3"}
    if spec not in full:
        valid = ", ".join(repr(name) for name in PIPELINE_NAMES)
        raise ValueError(f"unknown pipeline {spec!r}; valid names: {valid}")
    return full_size_config(full[spec])


def build_pipeline(spec: str, **kw: Any) -> StableDiffusionXLPipeline | StableDiffusion3Pipeline:
    """Build a pipeline by name: "sdxl" / "sd3" (tiny, CPU) or "sdxl-base-1.0" / "sd3-medium" (full size).

    Keyword arguments go to the builder (:func:`tiny_sdxl_pipeline`, :func:`tiny_sd3_pipeline` or
    :func:`full_size_pipeline`). An unknown name raises ``ValueError`` listing the valid names.
    """
    builder = _BUILDERS.get(spec)
    if builder is None:
        valid = ", ".join(repr(name) for name in PIPELINE_NAMES)
        raise ValueError(f"unknown pipeline {spec!r}; valid names: {valid}")
    pipe: StableDiffusionXLPipeline | StableDiffusion3Pipeline = builder(**kw)
    return pipe
