"""Architecture adapters: running the units in any number of stages equals ``model.forward`` exactly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

from accel.models import InputShape, SD3Adapter, UNetAdapter, UnsupportedModelError, adapt
from accel.models.base import DenoiserAdapter, SegmentState
from accel.partition import partition_chain, partition_onion
from accel.testing import tiny_sd3_pipeline, tiny_sdxl_pipeline


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Two OpenMP threads on a shared 2-core machine stall; one thread is faster and steadier here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- models -----------------------------------------------------------------------------------------
def _sdxl_unet() -> UNet2DConditionModel:
    return tiny_sdxl_pipeline().unet


def _unet(**overrides: Any) -> UNet2DConditionModel:
    """A tiny SDXL-shaped U-Net with 2-3 transformer blocks per attention (cuts inside attentions)."""
    config: dict[str, Any] = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=24,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 16,
        use_linear_projection=True,
    )
    config.update(overrides)
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def _sd1_unet() -> UNet2DConditionModel:
    """SD1.x layout: plain conditioning (no added embeddings), conv projections, four levels."""
    return _unet(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        transformer_layers_per_block=1,
        attention_head_dim=4,
        addition_embed_type=None,
        addition_time_embed_dim=None,
        projection_class_embeddings_input_dim=None,
        use_linear_projection=False,
    )


def _odd_blocks_unet() -> UNet2DConditionModel:
    """Self-attention blocks and block types that become one unit each (whole-block fallback)."""
    return _unet(
        block_out_channels=(16, 32, 32),
        down_block_types=("AttnDownBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        transformer_layers_per_block=1,
        attention_head_dim=8,
        addition_embed_type=None,
        addition_time_embed_dim=None,
        projection_class_embeddings_input_dim=None,
    )


def _sd3() -> SD3Transformer2DModel:
    return tiny_sd3_pipeline(with_t5=False).transformer


# -- running in stages --------------------------------------------------------------------------------
def _cuts(n_units: int, n_stages: int) -> list[int]:
    return [round(k * n_units / n_stages) for k in range(n_stages + 1)]


def _run_in_stages(adapter: DenoiserAdapter, cuts: list[int], args: tuple, kwargs: dict) -> Any:
    """Run contiguous stages one after another, as separate devices would.

    Each stage recomputes its own context with ``prepare`` and receives only the named tensors of the
    state (cloned, as if sent over a link).
    """
    state = adapter.prepare(*args, **kwargs)
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        context = adapter.prepare(*args, **kwargs).context
        sent = {name: t.clone() for name, t in adapter.state_tensors(state, lo).items()}
        state = adapter.run(adapter.with_tensors(context, sent, lo), lo, hi)
    return adapter.finish(state)


def _run_partition(
    adapter: DenoiserAdapter, stages: list[list[tuple[int, int]]], args: tuple, kwargs: dict
) -> Any:
    """Simulate a stage assignment the way the pipeline runtime executes it.

    Each stage keeps a store of the named tensors it produced; a segment starts from the tensors it needs
    (the trace's edges into it), taken from its own store or received (cloned) from the producer's stage.
    Everything received must be one of the partition's boundary edges.
    """
    edges = adapter.trace(*args, **kwargs)
    owner = {i: k for k, segs in enumerate(stages) for lo, hi in segs for i in range(lo, hi)}
    crossing = {(e.name, e.producer) for e in edges if owner[e.producer] != owner[e.consumer]}
    stores: list[dict[tuple[str, int], torch.Tensor]] = [{} for _ in stages]
    initial = adapter.prepare(*args, **kwargs)
    segments = sorted((lo, hi, k) for k, segs in enumerate(stages) for lo, hi in segs)
    received: set[tuple[str, int]] = set()
    state = initial
    for lo, hi, k in segments:
        tensors: dict[str, torch.Tensor] = {}
        if lo == 0:
            tensors.update(adapter.state_tensors(initial, 0))
        for e in edges:
            if lo <= e.consumer < hi and e.producer < lo:
                key = (e.name, e.producer)
                if owner[e.producer] == k:
                    tensors[e.name] = stores[k][key]
                else:
                    tensors[e.name] = stores[owner[e.producer]][key].clone()
                    received.add(key)
        state = adapter.with_tensors(adapter.prepare(*args, **kwargs).context, tensors, lo)
        produced: dict[str, int] = {}
        for index in range(lo, hi):
            before = adapter.state_tensors(state, index)
            adapter.run_unit(index, state)
            after = adapter.state_tensors(state, index + 1)
            for name, t in after.items():
                if before.get(name) is not t or any(e.name == name and e.producer == index for e in edges):
                    produced[name] = index
        for name, t in adapter.state_tensors(state, hi).items():
            if name in produced:
                stores[k][(name, produced[name])] = t
    assert received <= crossing
    return adapter.finish(state)


def _assert_same(out: Any, ref: Any) -> None:
    out_t = out[0] if isinstance(out, tuple) else out.sample
    ref_t = ref[0] if isinstance(ref, tuple) else ref.sample
    assert type(out) is type(ref)
    assert out_t.shape == ref_t.shape
    assert (out_t - ref_t).abs().max().item() <= 1e-6


def _check_all_splits(adapter: DenoiserAdapter, args: tuple, kwargs: dict) -> None:
    with torch.no_grad():
        ref = adapter.model(*args, **kwargs)
        _assert_same(adapter.forward(*args, **kwargs), ref)
        n = len(adapter.units)
        for stages in (1, 2, 3, 4):
            _assert_same(_run_in_stages(adapter, _cuts(n, stages), args, kwargs), ref)


# -- U-Net --------------------------------------------------------------------------------------------
def test_tiny_sdxl_units_equal_forward_for_1_to_4_stages() -> None:
    adapter = adapt(_sdxl_unet())
    assert isinstance(adapter, UNetAdapter) and adapter.family == "unet"
    assert adapter.units[0].name == "conv_in" and adapter.units[-1].name == "conv_out"
    assert len(adapter.units) >= 20
    args, kwargs = adapter.example_inputs(
        InputShape(batch=2, height=128, width=128, dtype=torch.float32, device="cpu")
    )
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    _check_all_splits(adapter, args, kwargs)


def test_cuts_inside_attention_carry_tokens_and_residual() -> None:
    adapter = adapt(_unet())
    names = [u.name for u in adapter.units]
    assert "down_blocks.2.attentions.0.transformer_blocks.2" in names
    args, kwargs = adapter.example_inputs(
        InputShape(batch=1, height=64, width=64, dtype=torch.float32, device="cpu")
    )
    _check_all_splits(adapter, args, kwargs)
    with torch.no_grad():
        ref = adapter.model(*args, **kwargs)
        inner = names.index("down_blocks.2.attentions.0.transformer_blocks.1")
        state = adapter.run(adapter.prepare(*args, **kwargs), 0, inner)
        assert set(state.carry) == {"tokens", "residual"}
        for cut in range(len(names) + 1):
            _assert_same(_run_in_stages(adapter, [0, cut, len(names)], args, kwargs), ref)


def test_plain_sd1_unet_and_return_tuple() -> None:
    adapter = adapt(_sd1_unet())
    args, kwargs = adapter.example_inputs(
        InputShape(batch=2, height=64, width=64, dtype=torch.float32, device="cpu")
    )
    assert "added_cond_kwargs" not in kwargs
    _check_all_splits(adapter, args, {**kwargs, "return_dict": False})


def test_whole_block_fallback_and_self_attention_blocks() -> None:
    adapter = adapt(_odd_blocks_unet())
    names = [u.name for u in adapter.units]
    assert "down_blocks.1" in names and "mid_block.resnets.0" in names and "up_blocks.0" in names
    assert "down_blocks.0.attentions.1" in names and "up_blocks.2.attentions.2" in names
    args, kwargs = adapter.example_inputs(
        InputShape(batch=1, height=64, width=64, dtype=torch.float32, device="cpu")
    )
    _check_all_splits(adapter, args, kwargs)


def test_odd_latent_size_forwards_upsample_sizes() -> None:
    adapter = adapt(_sdxl_unet())
    # 72x88 px -> a 9x11 latent, not a multiple of the U-Net's up factor 4: diffusers forwards upsample sizes.
    args, kwargs = adapter.example_inputs(
        InputShape(batch=1, height=72, width=88, dtype=torch.float32, device="cpu")
    )
    state = adapter.prepare(*args, **kwargs)
    assert state.context["upsample_sizes"][:2] == [torch.Size([5, 6]), torch.Size([9, 11])]
    _check_all_splits(adapter, args, kwargs)


def test_controlnet_residuals_masks_and_cross_attention_kwargs() -> None:
    adapter = adapt(_unet())
    args, kwargs = adapter.example_inputs(
        InputShape(batch=2, height=64, width=64, dtype=torch.float32, device="cpu")
    )
    edges = adapter.trace(*args, **kwargs)
    skips = sorted((e for e in edges if e.name.startswith("skips.")), key=lambda e: int(e.name.split(".")[1]))
    gen = torch.Generator().manual_seed(1)
    down = tuple(torch.randn(e.shape, generator=gen) for e in skips)
    mid_shape = next(
        e.shape
        for e in edges
        if e.consumer
        == adapter.units.index(next(u for u in adapter.units if u.name == "up_blocks.0.resnets.0"))
        and e.name == "carry.sample"
    )
    mid = torch.randn(mid_shape, generator=gen)
    mask = torch.ones(2, 77)
    mask[:, 40:] = 0
    _check_all_splits(
        adapter,
        args,
        {
            **kwargs,
            "down_block_additional_residuals": down,
            "mid_block_additional_residual": mid,
            "encoder_attention_mask": mask,
            "cross_attention_kwargs": {"scale": 1.0},
        },
    )
    with pytest.raises(ValueError, match="one ControlNet residual per skip"):
        adapter.prepare(
            *args, **kwargs, down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid
        )


def test_t2i_adapter_residuals_and_freeu() -> None:
    model = _unet()
    adapter = adapt(model)
    args, kwargs = adapter.example_inputs(
        InputShape(batch=1, height=64, width=64, dtype=torch.float32, device="cpu")
    )
    edges = adapter.trace(*args, **kwargs)
    gen = torch.Generator().manual_seed(2)
    # One residual per down block plus one for the mid block. diffusers adds it after a plain block's
    # downsampler, but before a cross-attention block's downsampler (after its last attention).
    prefixes = ["down_blocks.0.", "down_blocks.1.attentions.", "down_blocks.2.attentions."]
    ends = {
        b: max(i for i, u in enumerate(adapter.units) if u.name.startswith(p)) for b, p in enumerate(prefixes)
    }
    shapes = [
        next(e.shape for e in edges if e.producer == ends[b] and e.name == "carry.sample") for b in range(3)
    ]
    intrablock = [torch.randn(s, generator=gen) for s in [*shapes, shapes[-1]]]
    # The tensors are consumed by diffusers' forward (list.pop), so each call gets a fresh list.
    with torch.no_grad():
        ref = model(*args, **kwargs, down_intrablock_additional_residuals=list(intrablock))
        out = adapter.forward(*args, **kwargs, down_intrablock_additional_residuals=list(intrablock))
        _assert_same(out, ref)
        n = len(adapter.units)
        for stages in (2, 3):
            split = _run_in_stages(
                adapter,
                _cuts(n, stages),
                args,
                {**kwargs, "down_intrablock_additional_residuals": list(intrablock)},
            )
            _assert_same(split, ref)
    model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        _check_all_splits(adapter, args, kwargs)
    finally:
        model.disable_freeu()


def test_onion_and_chain_partitions_run_with_boundary_tensors_only() -> None:
    adapter = adapt(_unet())
    args, kwargs = adapter.example_inputs(
        InputShape(batch=1, height=64, width=64, dtype=torch.float32, device="cpu")
    )
    edges = adapter.trace(*args, **kwargs)
    n = len(adapter.units)
    costs = [1.0 + (i % 5) for i in range(n)]
    with torch.no_grad():
        ref = adapter.model(*args, **kwargs)
        for devices in (2, 3, 4):
            for cut in (partition_onion, partition_chain):
                part = cut(costs, devices, edges, link_gbps=1.0)
                _assert_same(_run_partition(adapter, [s.segments for s in part.stages], args, kwargs), ref)


def test_trace_and_skip_bookkeeping() -> None:
    adapter = adapt(_sdxl_unet())
    args, kwargs = adapter.example_inputs(
        InputShape(batch=1, height=128, width=128, dtype=torch.float32, device="cpu")
    )
    edges = adapter.trace(*args, **kwargs)
    n = len(adapter.units)
    assert all(0 <= e.producer < e.consumer < n for e in edges)
    carry = [e for e in edges if e.name == "carry.sample"]
    assert {(e.producer, e.consumer) for e in carry} == {(i, i + 1) for i in range(n - 1)}
    skips = [e for e in edges if e.name.startswith("skips.")]
    assert len(skips) == adapter.skip_depth(
        adapter.units.index(next(u for u in adapter.units if u.name == "mid_block.resnets.0"))
    )
    assert adapter.skip_depth(0) == 0 and adapter.skip_depth(n) == 0
    assert all(e.nbytes == 4 * torch.Size(e.shape).numel() and e.dtype == "float32" for e in edges)
    # Onion-friendly: every skip goes from a down unit to its mirrored up unit (nested, never crossing).
    spans = sorted((e.producer, e.consumer) for e in skips)
    for (p1, c1), (p2, c2) in zip(spans, spans[1:], strict=False):
        assert p1 < p2 and c2 < c1
    with pytest.raises(ValueError, match="top of the skip stack"):
        adapter.with_tensors({}, {"skips.0": torch.zeros(1)}, n - 1)


# -- DiT ----------------------------------------------------------------------------------------------
def test_tiny_sd3_units_equal_forward_for_1_to_4_stages() -> None:
    adapter = adapt(_sd3())
    assert isinstance(adapter, SD3Adapter) and adapter.family == "dit"
    assert [u.name for u in adapter.units][:2] == ["embed", "transformer_blocks.0"]
    assert adapter.units[-1].name == "out" and len(adapter.units) == len(adapter.model.transformer_blocks) + 2
    args, kwargs = adapter.example_inputs(
        InputShape(batch=2, height=128, width=128, dtype=torch.float32, device="cpu", text_len=20)
    )
    assert kwargs["encoder_hidden_states"].shape[1] == 20
    _check_all_splits(adapter, args, kwargs)
    _check_all_splits(adapter, args, {**kwargs, "return_dict": False})


def test_sd3_controlnet_skip_layers_and_boundary() -> None:
    adapter = adapt(_sd3())
    args, kwargs = adapter.example_inputs(
        InputShape(batch=1, height=128, width=128, dtype=torch.float32, device="cpu", text_len=12)
    )
    tokens = (128 // 8 // 2) ** 2
    inner = adapter.model.inner_dim
    controlnet = [torch.randn(1, tokens, inner, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    _check_all_splits(
        adapter, args, {**kwargs, "block_controlnet_hidden_states": controlnet, "skip_layers": [2]}
    )
    edges = adapter.trace(*args, **kwargs)
    middle = [e for e in edges if e.producer == 3 and e.consumer == 4]
    assert {e.name for e in middle} == {"carry.hidden_states", "carry.encoder_hidden_states"}
    assert {e.shape for e in middle} == {(1, tokens, inner), (1, 12, inner)}


def test_default_text_len_matches_sd3_with_t5() -> None:
    adapter = adapt(_sd3())
    _, kwargs = adapter.example_inputs(
        InputShape(batch=1, height=128, width=128, dtype=torch.float32, device="cpu")
    )
    assert kwargs["encoder_hidden_states"].shape[1] == 333


# -- errors ---------------------------------------------------------------------------------------------
def test_unsupported_models_name_what_is_missing() -> None:
    with pytest.raises(UnsupportedModelError, match=r"Linear.*conv_in.*pos_embed"):
        adapt(torch.nn.Linear(2, 2))

    class HalfUNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down_blocks = torch.nn.ModuleList()

    with pytest.raises(UnsupportedModelError, match=r"HalfUNet.*missing.*conv_in"):
        adapt(HalfUNet())

    class Blocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList()

    with pytest.raises(UnsupportedModelError, match=r"Blocks.*missing pos_embed"):
        adapt(Blocks())
    with pytest.raises(IndexError, match="outside"):
        adapt(_sd3()).run(SegmentState(context={}, carry={}), 0, 99)


def test_unet_steps_take_no_default_arguments() -> None:
    """Unit steps bind modules as closure variables: torch.compile guards on default arguments through a
    source that torch 2.11 cannot read back from inductor's cache, so engines would compile again."""
    for unet in (tiny_sdxl_pipeline().unet, _sd1_unet(), _odd_blocks_unet()):
        steps = adapt(unet)._steps  # type: ignore[attr-defined]
        assert steps
        for step in steps:
            for fn in (step.fn, *step.post):
                assert getattr(fn, "__defaults__", None) is None, step.name
                assert getattr(fn, "__kwdefaults__", None) is None, step.name
