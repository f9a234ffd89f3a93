"""The trained quality models: an SDXL-family and an SD3-family digit pipeline and a digit classifier.

Each pipeline is a real diffusers pipeline (``StableDiffusionXLPipeline`` with a ``UNet2DConditionModel``,
``StableDiffusion3Pipeline`` with an ``SD3Transformer2DModel``) that generates 8x8 digits from prompts
such as ``"a handwritten digit 7"``. The denoiser, the VAE and the scheduler are committed in a diffusers
folder per family (``weights/sdxl``, ``weights/sd3``: ``save_pretrained`` sub-folders plus
``quality.json``). The frozen text encoders are the tiny random-weight CLIP encoders of
:mod:`accel.testing.pipelines`, rebuilt from their seed (their 49,408-token embedding tables would be most
of the files otherwise); ``quality.json`` keeps a fingerprint of their outputs, so that a rebuild that
differs (for example without ``open-clip-torch``'s real CLIP vocabulary) is refused instead of silently
feeding the denoiser conditioning it never saw.

>>> model = load_quality_model("sdxl")
>>> images = model.pipe(prompt="a handwritten digit 7", **model.call_kwargs).images
>>> classifier = load_classifier()
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch import nn

from accel.atomic import atomic_path, write_text_atomic
from accel.errors import AccelError
from accel.testing.pipelines import tiny_text_components
from accel.testing.quality.data import DIGITS, IMAGE_SIZE, digit_prompt

FAMILIES: tuple[str, ...] = ("sdxl", "sd3")
MANIFEST = "quality.json"
CLASSIFIER_FILE = "classifier.safetensors"
TOKENIZER_MAX_LENGTH = 16
"""Prompts are padded to 16 CLIP tokens (not 77): the digit prompts need 6, and shorter text states keep
training and the harness fast on a CPU."""

SD3_T5_TOKENS = 1
"""``max_sequence_length`` of the SD3 pipeline: without a T5 encoder SD3 appends that many zero tokens to
the text states; the model was trained with one, and attention sees every extra copy, so calls must pass
the same value (it is in :attr:`QualityModel.call_kwargs`)."""

GUIDANCE: dict[str, float] = {"sdxl": 5.0, "sd3": 7.0}
"""The guidance scales the published method uses for SDXL and SD3."""

_DENOISER = {"sdxl": "unet", "sd3": "transformer"}
#: The denoiser adapter family (``accel.models``) of each quality model family: its schedule defaults.
ADAPTER_FAMILY: dict[str, str] = {"sdxl": "unet", "sd3": "dit"}
_TEXT_CHECK_RTOL = 1e-4


class QualityModelError(AccelError, RuntimeError):
    """A committed quality model cannot be rebuilt as it was trained (the message says why)."""


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown quality model family {family!r}; valid families: {', '.join(FAMILIES)}")


# --------------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------------
def vae_config() -> dict[str, Any]:
    """A one-level ``AutoencoderKL`` (no downsampling): 8x8 RGB images <-> 8x8x4 latents."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        block_out_channels=[32],
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        force_upcast=False,
    )


def unet_config() -> dict[str, Any]:
    """SDXL's U-Net topology at 8x8 latents: a plain down block, two cross-attention down blocks, a
    cross-attention mid block, mirrored up blocks, text-time conditioning (about 0.6 M parameters)."""
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=[32, 32, 32],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        # diffusers' historical naming: for this U-Net "attention_head_dim" is the number of heads.
        attention_head_dim=[2, 2, 2],
        transformer_layers_per_block=[1, 1, 1],
        use_linear_projection=True,
        norm_num_groups=8,
        cross_attention_dim=64,  # the two CLIP encoders' hidden sizes, 32 + 32
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + the pooled projection
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def sd3_transformer_config() -> dict[str, Any]:
    """SD3's MMDiT topology at 8x8 latents (16 patches): 4 joint blocks, the last one context-pre-only."""
    return dict(
        sample_size=IMAGE_SIZE,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        caption_projection_dim=64,
        joint_attention_dim=64,  # CLIP hidden states (32 + 32) and the zero T5 tokens
        pooled_projection_dim=64,  # the two CLIP projections, 32 + 32
        pos_embed_max_size=8,
    )


def scheduler_for(family: str) -> EulerDiscreteScheduler | FlowMatchEulerDiscreteScheduler:
    """SDXL's Euler scheduler (epsilon prediction, scaled-linear betas) or SD3's flow-matching one."""
    _check_family(family)
    if family == "sdxl":
        return EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            timestep_spacing="leading",
            prediction_type="epsilon",
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


class DigitClassifier(nn.Module):
    """A small CNN that reads grey 8x8 digits in ``[0, 1]`` (``[N, 8, 8]``) and returns 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Dropout(0.2))
        self.out = nn.Linear(128, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, 10]``."""
        return self.out(self.head(self.features(images.unsqueeze(1))))

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, 10]`` on the CPU; the module is put in eval mode."""
        self.eval()
        param = next(self.parameters())
        return self(images.to(param.device, param.dtype)).softmax(dim=1).cpu()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The most likely digit per image (``[N]``, int64)."""
        return self.probabilities(images).argmax(dim=1)


# --------------------------------------------------------------------------------------------------------
# Assembling and loading
# --------------------------------------------------------------------------------------------------------
@dataclass
class QualityModel:
    """A quality pipeline with the call arguments it was trained for.

    Attributes:
        family: ``"sdxl"`` or ``"sd3"``.
        pipe: the diffusers pipeline (fp32).
        call_kwargs: ``height``/``width`` (8), ``guidance_scale`` (5 for SDXL, 7 for SD3) and, for SD3,
            ``max_sequence_length``; pass them with every call.
        manifest: the folder's ``quality.json`` (training and evaluation record); empty before saving.
    """

    family: str
    pipe: Any
    call_kwargs: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)


def call_kwargs_for(family: str) -> dict[str, Any]:
    """The pipeline call arguments a quality model of ``family`` was trained for."""
    _check_family(family)
    kwargs: dict[str, Any] = dict(height=IMAGE_SIZE, width=IMAGE_SIZE, guidance_scale=GUIDANCE[family])
    if family == "sd3":
        kwargs["max_sequence_length"] = SD3_T5_TOKENS
    return kwargs


def assemble_pipeline(family: str, *, denoiser: Any, vae: Any, scheduler: Any, text_seed: int) -> Any:
    """A ``family`` pipeline from its image components and the tiny CLIP encoders rebuilt from ``text_seed``."""
    _check_family(family)
    text = tiny_text_components(family, seed=text_seed, max_length=TOKENIZER_MAX_LENGTH)
    pipe: Any
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, unet=denoiser, scheduler=scheduler, add_watermarker=False, **text
        )
    else:
        pipe = StableDiffusion3Pipeline(
            transformer=denoiser, vae=vae, scheduler=scheduler, text_encoder_3=None, tokenizer_3=None, **text
        )
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def new_denoiser(family: str, *, seed: int) -> Any:
    """The untrained denoiser of ``family`` (weights from ``seed``; the global RNG is left as it was)."""
    _check_family(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sdxl":
            return UNet2DConditionModel(**unet_config())
        return SD3Transformer2DModel(**sd3_transformer_config())


def new_vae(*, seed: int) -> Any:
    """The untrained VAE (weights from ``seed``; the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**vae_config())


def set_latent_normalisation(vae: Any, family: str, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Record how the pipeline scales latents, from per-channel statistics of encoded training images.

    SDXL pipelines read per-channel ``latents_mean``/``latents_std``; SD3 pipelines a scalar
    ``shift_factor``/``scaling_factor``. Either way the denoiser sees latents of zero mean, unit scale.
    """
    _check_family(family)
    if family == "sdxl":
        vae.register_to_config(
            scaling_factor=1.0,
            latents_mean=[float(v) for v in mean],
            latents_std=[float(v) for v in std],
            shift_factor=None,
        )
    else:
        overall_mean = float(mean.mean())
        # The pooled standard deviation about the overall mean, from the per-channel moments.
        overall_std = float(((std**2 + (mean - overall_mean) ** 2).mean()).sqrt())
        vae.register_to_config(
            scaling_factor=1.0 / overall_std, shift_factor=overall_mean, latents_mean=None, latents_std=None
        )


def normalise_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents in the space the denoiser works in (the inverse of the pipelines' decode scaling)."""
    config = vae.config
    if getattr(config, "latents_mean", None) is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(config.latents_mean, dtype=latents.dtype).view(shape)
        std = torch.tensor(config.latents_std, dtype=latents.dtype).view(shape)
        return (latents - mean) * config.scaling_factor / std
    shift = getattr(config, "shift_factor", None) or 0.0
    return (latents - shift) * config.scaling_factor


def default_weights_dir() -> Path:
    """Where the committed quality models live (inside the installed package)."""
    return Path(str(resources.files("accel.testing.quality").joinpath("weights")))


def model_dir(family: str, root: str | Path | None = None) -> Path:
    """The folder of ``family``'s committed pipeline under ``root`` (default: the package's)."""
    _check_family(family)
    return Path(root if root is not None else default_weights_dir()) / family


@dataclass(frozen=True)
class DigitConditioning:
    """The text conditioning of the ten digit prompts and of the unconditional (negative) branch.

    ``embeds``/``pooled``: ``[10, T, D]``/``[10, P]``, row ``d`` for digit ``d``; ``negative``/
    ``negative_pooled``: ``[1, T, D]``/``[1, P]``, what the pipeline feeds the unconditional branch when no
    negative prompt is given (zeros for SDXL, the empty prompt's states for SD3).
    """

    embeds: torch.Tensor
    negative: torch.Tensor
    pooled: torch.Tensor
    negative_pooled: torch.Tensor


def encode_digit_prompts(pipe: Any, family: str) -> DigitConditioning:
    """Encode the ten digit prompts exactly as the pipeline does in a call without a negative prompt."""
    _check_family(family)
    prompts = [digit_prompt(d) for d in DIGITS]
    cpu = torch.device("cpu")
    with torch.no_grad():
        if family == "sdxl":
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompts, device=cpu, num_images_per_prompt=1, do_classifier_free_guidance=True
            )
        else:
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=cpu,
                do_classifier_free_guidance=True,
                max_sequence_length=SD3_T5_TOKENS,
            )
    return DigitConditioning(
        embeds=embeds, negative=negative[:1], pooled=pooled, negative_pooled=negative_pooled[:1]
    )


def text_fingerprint(pipe: Any, family: str) -> list[float]:
    """Mean absolute value of the text states and pooled embedding of every digit prompt and of the
    negative branch, in a fixed order: what the denoiser's conditioning depends on."""
    text = encode_digit_prompts(pipe, family)
    values = [float(t.abs().mean()) for t in (*text.embeds, *text.pooled)]
    return values + [float(text.negative.abs().mean()), float(text.negative_pooled.abs().mean())]


def save_quality_model(model: QualityModel, folder: str | Path) -> Path:
    """Write the denoiser, VAE and scheduler (``save_pretrained``, safetensors) and ``quality.json``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    pipe = model.pipe
    name = _DENOISER[model.family]
    getattr(pipe, name).save_pretrained(out / name, safe_serialization=True)
    pipe.vae.save_pretrained(out / "vae", safe_serialization=True)
    pipe.scheduler.save_pretrained(out / "scheduler")
    # safetensors files come out private (0600); give them the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    for path in out.rglob("*.safetensors"):
        path.chmod(0o666 & ~umask)
    write_manifest(out, model.manifest)
    return out


def write_manifest(folder: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write a model folder's ``quality.json`` (atomically)."""
    return write_text_atomic(
        Path(folder) / MANIFEST, json.dumps(dict(manifest), indent=2, sort_keys=True) + "\n"
    )


def load_quality_model(
    family: str,
    *,
    root: str | Path | None = None,
    device: str | torch.device = "cpu",
    check_text: bool = True,
) -> QualityModel:
    """Load the committed ``family`` quality pipeline (fp32) from ``root`` (default: the package's).

    Raises:
        QualityModelError: the folder is missing, or the rebuilt text encoders do not reproduce the
            conditioning the model was trained with (``check_text``).
    """
    folder = model_dir(family, root)
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        raise QualityModelError(
            f"no trained {family} quality model at {folder}: run `python benchmarks/quality/train.py` first."
        )
    manifest = json.loads(manifest_file.read_text())
    name = _DENOISER[family]
    denoiser_cls = UNet2DConditionModel if family == "sdxl" else SD3Transformer2DModel
    # low_cpu_mem_usage needs `accelerate`; these models are a few MB.
    denoiser = denoiser_cls.from_pretrained(folder / name, low_cpu_mem_usage=False)
    vae = AutoencoderKL.from_pretrained(folder / "vae", low_cpu_mem_usage=False)
    scheduler_cls = EulerDiscreteScheduler if family == "sdxl" else FlowMatchEulerDiscreteScheduler
    scheduler = scheduler_cls.from_pretrained(folder / "scheduler")
    pipe = assemble_pipeline(
        family, denoiser=denoiser, vae=vae, scheduler=scheduler, text_seed=int(manifest["text_seed"])
    )
    if check_text:
        _check_text(pipe, family, manifest.get("text_fingerprint", []), folder)
    pipe.to(device)
    return QualityModel(family=family, pipe=pipe, call_kwargs=call_kwargs_for(family), manifest=manifest)


def _check_text(pipe: Any, family: str, expected: Sequence[float], folder: Path) -> None:
    got = text_fingerprint(pipe, family)
    close = len(got) == len(expected) and all(
        abs(a - b) <= _TEXT_CHECK_RTOL * max(abs(b), 1e-6) for a, b in zip(got, expected, strict=True)
    )
    if not close:
        from accel.testing.tokenizers import has_real_clip_vocab

        hint = (
            "open-clip-torch is not installed, so the CLIP tokenizer fell back to a byte-level vocabulary; "
            "install it with `pip install --no-deps open-clip-torch`"
            if not has_real_clip_vocab()
            else "this torch build initialises the random text encoders differently from the one that "
            "trained the model; retrain with `python benchmarks/quality/train.py`"
        )
        raise QualityModelError(
            f"the rebuilt text encoders of {folder} do not reproduce the conditioning the model was trained "
            f"with: {hint}."
        )


def save_classifier(classifier: DigitClassifier, folder: str | Path, info: Mapping[str, Any]) -> Path:
    """Write the classifier's weights (safetensors) and its record (held-out accuracy) next to them."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in classifier.state_dict().items()}
    with atomic_path(out / CLASSIFIER_FILE) as tmp:
        save_file(state, tmp)
    write_text_atomic(out / "classifier.json", json.dumps(dict(info), indent=2, sort_keys=True) + "\n")
    return out / CLASSIFIER_FILE


def load_classifier(root: str | Path | None = None) -> DigitClassifier:
    """The committed digit classifier (eval mode, CPU)."""
    from safetensors.torch import load_file

    path = Path(root if root is not None else default_weights_dir()) / CLASSIFIER_FILE
    if not path.is_file():
        raise QualityModelError(f"no digit classifier at {path}: run `python benchmarks/quality/train.py`.")
    classifier = DigitClassifier()
    classifier.load_state_dict(load_file(str(path)))
    return classifier.eval()


def classifier_record(root: str | Path | None = None) -> dict[str, Any]:
    """The committed classifier's training record (held-out accuracy, split, epochs)."""
    path = Path(root if root is not None else default_weights_dir()) / "classifier.json"
    return dict(json.loads(path.read_text())) if path.is_file() else {}
