"""Tests for accel.testing: offline tokenizers, tiny random-weight pipelines, full-size builders."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from PIL import Image

import accel.testing.tokenizers as tokenizers_module
from accel.testing import (
    build_pipeline,
    clip_tokenizer,
    full_size_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
)
from accel.testing.pipelines import PIPELINE_NAMES, full_size_config
from accel.testing.tokenizers import has_real_clip_vocab, t5_tokenizer

SENTENCE = "a photo of an astronaut riding a horse on mars"
FAMILIES = ("sdxl", "sd3")
LATENT_CHANNELS = {"sdxl": 4, "sd3": 16}
DENOISER = {"sdxl": "unet", "sd3": "transformer"}

# Small but consistent dimensions for building the full-size JSON architectures on a CPU.
_TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
_TINY_VAE = {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8, "layers_per_block": 1}
TINY_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "sdxl": {
        "unet": {
            "block_out_channels": [32, 48, 64],
            "attention_head_dim": [2, 4, 4],
            "transformer_layers_per_block": [1, 1, 1],
            "cross_attention_dim": 64,
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "norm_num_groups": 16,
            "sample_size": 8,
        },
        "vae": _TINY_VAE,
        "text_encoder": _TINY_CLIP,
        "text_encoder_2": _TINY_CLIP,
    },
    "sd3": {
        "transformer": {
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "caption_projection_dim": 32,
            "joint_attention_dim": 64,
            "pooled_projection_dim": 64,
            "sample_size": 8,
            "pos_embed_max_size": 16,
        },
        "vae": _TINY_VAE,
        "text_encoder": _TINY_CLIP,
        "text_encoder_2": _TINY_CLIP,
    },
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, 2-thread OpenMP ops on 128x128 activations (the
    VAE decode) wait for a busy core and run 10-100x slower. No assertion depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    built = {"sdxl": tiny_sdxl_pipeline(), "sd3": tiny_sd3_pipeline()}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


def _latents(pipe: Any, prompt: str | list[str] = "a cat", seed: int = 7, **kw: Any) -> torch.Tensor:
    call: dict[str, Any] = dict(
        prompt=prompt,
        negative_prompt="blurry" if isinstance(prompt, str) else ["blurry"] * len(prompt),
        num_inference_steps=3,
        guidance_scale=5.0,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    call.update(kw)
    images: torch.Tensor = pipe(**call).images
    return images


def _weights(pipe: Any, name: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}


# ----------------------------------------------------------------------------------------------------- tokenizers
def test_clip_tokenizer_round_trips_and_pads_to_77() -> None:
    tok = clip_tokenizer()
    ids = tok(SENTENCE, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert tok.model_max_length == 77
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert tok.decode(ids, skip_special_tokens=True) == SENTENCE
    if has_real_clip_vocab():
        assert len(tok) == 49408
        assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
        # OpenAI CLIP's ids for this sentence.
        assert ids[:12] == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]


def test_clip_tokenizer_custom_length() -> None:
    tok = clip_tokenizer(max_length=16)
    ids = tok(SENTENCE * 4, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 16 and ids[-1] == tok.eos_token_id


def test_clip_tokenizer_byte_level_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizers_module, "_bpe_path", lambda: None)
    assert not tokenizers_module.has_real_clip_vocab()
    tok = tokenizers_module.clip_tokenizer()
    assert len(tok) == tokenizers_module.clip_vocab_size() == 2 * 256 + 2
    ids = tok(SENTENCE, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert tok.decode(ids, skip_special_tokens=True) == SENTENCE


def test_t5_tokenizer_round_trips() -> None:
    tok = t5_tokenizer()
    ids = tok("An astronaut, riding a horse!", padding="max_length", max_length=48, truncation=True).input_ids
    assert len(ids) == 48
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.decode(ids, skip_special_tokens=True) == "An astronaut, riding a horse!"


# ---------------------------------------------------------------------------------------------- tiny pipelines
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_generates_latents_deterministically(pipes: dict[str, Any], family: str) -> None:
    pipe = pipes[family]
    first = _latents(pipe)
    assert first.shape == (1, LATENT_CHANNELS[family], 16, 16)
    assert torch.isfinite(first).all()
    assert torch.equal(first, _latents(pipe))
    assert not torch.equal(first, _latents(pipe, seed=8))


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_batch_of_prompts_to_pil(pipes: dict[str, Any], family: str) -> None:
    out = pipes[family](
        prompt=["a cat", "a dog on a hill"],
        negative_prompt=["blurry", "ugly"],
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(0),
    )
    assert len(out.images) == 2
    assert all(isinstance(im, Image.Image) and im.size == (128, 128) for im in out.images)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_weights_follow_seed_and_spare_caller_rng(pipes: dict[str, Any], family: str) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    same = build_pipeline(family, seed=0)
    other = build_pipeline(family, seed=1)
    assert torch.equal(torch.get_rng_state(), state)

    for name in (DENOISER[family], "text_encoder", "text_encoder_2", "vae"):
        reference, rebuilt = _weights(pipes[family], name), _weights(same, name)
        assert all(torch.equal(reference[k], rebuilt[k]) for k in reference), name
    reference, changed = _weights(pipes[family], DENOISER[family]), _weights(other, DENOISER[family])
    assert any(not torch.equal(reference[k], changed[k]) for k in reference)

    # every component in eval mode (T5/CLIP dropout would otherwise make runs differ)
    for component in same.components.values():
        if isinstance(component, torch.nn.Module):
            assert not component.training


def test_tiny_sdxl_topology(pipes: dict[str, Any]) -> None:
    pipe = pipes["sdxl"]
    unet, te1, te2 = pipe.unet, pipe.text_encoder, pipe.text_encoder_2
    assert len(unet.down_blocks) >= 3 and len(unet.up_blocks) == len(unet.down_blocks)
    assert [type(b).__name__ for b in unet.down_blocks][1:] == ["CrossAttnDownBlock2D"] * 2
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert unet.config.layers_per_block == 2
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    assert unet.config.projection_class_embeddings_input_dim == (
        6 * unet.config.addition_time_embed_dim + te2.config.projection_dim
    )
    assert 1_000_000 < sum(p.numel() for p in unet.parameters()) < 4_000_000
    assert te1.config.vocab_size == te2.config.vocab_size == len(pipe.tokenizer)
    assert pipe.default_sample_size * pipe.vae_scale_factor == 128


def test_tiny_sd3_topology_and_without_t5(pipes: dict[str, Any]) -> None:
    pipe = pipes["sd3"]
    transformer = pipe.transformer
    assert len(transformer.transformer_blocks) >= 4
    assert transformer.config.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert transformer.config.pooled_projection_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert pipe.text_encoder_3.config.vocab_size == len(pipe.tokenizer_3)

    no_t5 = tiny_sd3_pipeline(with_t5=False, dtype=torch.float32)
    no_t5.set_progress_bar_config(disable=True)
    assert no_t5.text_encoder_3 is None and no_t5.tokenizer_3 is None
    assert torch.equal(
        _weights(no_t5, "transformer")["pos_embed.proj.weight"], pipe.transformer.pos_embed.proj.weight
    )
    assert torch.isfinite(_latents(no_t5, num_inference_steps=2)).all()


def test_tiny_pipeline_dtype() -> None:
    pipe = tiny_sd3_pipeline(with_t5=False, dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert pipe.vae.dtype == torch.bfloat16


def test_tiny_sdxl_with_byte_level_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizers_module, "_bpe_path", lambda: None)
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == 514
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert torch.isfinite(_latents(pipe, num_inference_steps=2)).all()


# ------------------------------------------------------------------------------------------------ build_pipeline
def test_build_pipeline_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown pipeline 'sdxl-turbo'") as info:
        build_pipeline("sdxl-turbo")
    for name in ("sdxl", "sd3", "sdxl-base-1.0", "sd3-medium"):
        assert repr(name) in str(info.value)
    assert set(PIPELINE_NAMES) == {"sdxl", "sd3", "sdxl-base-1.0", "sd3-medium"}


# ------------------------------------------------------------------------------------------- full-size pipelines
@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_pipeline_with_tiny_overrides_builds_and_runs_on_cpu(family: str) -> None:
    overrides = TINY_OVERRIDES[family]
    spec = {"sdxl": "sdxl-base-1.0", "sd3": "sd3-medium"}[family]
    pipe = build_pipeline(spec, device="cpu", dtype=torch.float32, overrides=overrides)
    pipe.set_progress_bar_config(disable=True)
    json_configs = full_size_config(family)

    name = DENOISER[family]
    config = getattr(pipe, name).config
    for key, value in json_configs[name].items():
        if key.startswith("_"):
            continue
        expected = overrides[name].get(key, value)
        actual = config[key]
        assert (list(actual) if isinstance(actual, tuple) else actual) == expected, key
    for key in ("num_hidden_layers", "hidden_act"):
        assert (
            pipe.text_encoder_2.config.to_dict()[key] == {**json_configs["text_encoder_2"], **_TINY_CLIP}[key]
        )
    assert pipe.text_encoder.config.vocab_size == 49408
    assert type(pipe.scheduler).__name__ == json_configs["scheduler"]["_class_name"]
    assert not getattr(pipe, name).training

    latents = _latents(pipe, num_inference_steps=2, height=64, width=64)
    assert latents.shape == (1, LATENT_CHANNELS[family], 8, 8)
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize(
    ("family", "with_t5", "denoiser_params", "total_params"),
    [
        ("sdxl", False, 2_567_463_684, 3_468_837_867),
        ("sd3", False, 2_028_328_000, 2_930_457_827),
        ("sd3", True, 2_028_328_000, 7_692_768_483),
    ],
)
def test_full_size_architectures_on_meta_device(
    family: str, with_t5: bool, denoiser_params: int, total_params: int
) -> None:
    """The shipped JSON configs assemble into the published architectures (no memory, no init cost)."""
    pipe = full_size_pipeline(family, device="meta", with_t5=with_t5)
    denoiser = getattr(pipe, DENOISER[family])
    assert sum(p.numel() for p in denoiser.parameters()) == denoiser_params
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert sum(p.numel() for m in modules for p in m.parameters()) == total_params
    assert denoiser.dtype == torch.float16 and denoiser.device.type == "meta"
    assert pipe.default_sample_size * pipe.vae_scale_factor == 1024
    if with_t5:  # like from_pretrained(torch_dtype=float16): T5's `wo` projections stay in float32
        assert pipe.text_encoder_3.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"unett": {"sample_size": 8}}, "unknown component 'unett'"),
        ({"unet": {"block_out_channel": [8]}}, "not config entries"),
        ({"text_encoder": {"hidden_size": 32}}, "cross_attention_dim"),
    ],
)
def test_full_size_pipeline_rejects_bad_overrides(overrides: dict[str, dict[str, Any]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        full_size_pipeline("sdxl", device="meta", overrides=overrides)


def test_full_size_pipeline_rejects_unknown_family() -> None:
    with pytest.raises(ValueError, match="valid families: sdxl, sd3"):
        full_size_pipeline("sd2", device="meta")
