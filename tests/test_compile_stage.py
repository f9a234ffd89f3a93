"""Stage modules: the whole denoiser or a unit range as flat tensors in, flat tensors out, exact vs eager."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from accel.compile.stage import StageError, build_stage, stage_fingerprint
from accel.models import InputShape, adapt
from accel.testing import build_pipeline


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(family: str):
    pipe = build_pipeline(family)
    model = (pipe.unet if family == "sdxl" else pipe.transformer).eval()
    adapter = adapt(model)
    args, kwargs = adapter.example_inputs(
        InputShape(batch=1, height=128, width=128, dtype=torch.float32, device="cpu", text_len=16)
    )
    return model, adapter, args, kwargs


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@torch.no_grad()
def test_whole_stage_equals_forward(family: str) -> None:
    model, adapter, args, kwargs = _setup(family)
    expected = model(*args, **kwargs, return_dict=False)[0]
    stage, inputs = build_stage(adapter, 0, len(adapter.units), args, kwargs, whole=True)
    assert all(isinstance(t, torch.Tensor) for t in inputs)
    assert all(n.startswith("forward.") for n in stage.input_names)
    torch.testing.assert_close(stage(*inputs)[0], expected, rtol=0, atol=0)
    # The runtime's path: forward arguments -> flat inputs.
    torch.testing.assert_close(stage(*stage.forward_inputs(*args, **kwargs))[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize(("family", "cuts"), [("sdxl", [0, 5, 17, 30, 34]), ("sd3", [0, 1, 4, 8])])
@torch.no_grad()
def test_unit_ranges_chain_to_forward(family: str, cuts: list[int]) -> None:
    model, adapter, args, kwargs = _setup(family)
    expected = model(*args, **kwargs, return_dict=False)[0]
    stages = [build_stage(adapter, lo, hi, args, kwargs)[0] for lo, hi in zip(cuts, cuts[1:], strict=False)]
    state = adapter.prepare(*args, **kwargs)
    for stage in stages:
        assert all(n.startswith(("context.", "carry.", "skips.")) for n in stage.input_names)
        state = stage.run_state(stage, state)
    out = adapter.finish(state)
    torch.testing.assert_close(out.sample, expected, rtol=0, atol=0)


@torch.no_grad()
def test_stage_refuses_other_shape_and_fingerprint_ignores_weights() -> None:
    model, adapter, args, kwargs = _setup("sd3")
    stage, _ = build_stage(adapter, 1, 3, args, kwargs)
    args2, kwargs2 = adapter.example_inputs(
        InputShape(batch=2, height=128, width=128, dtype=torch.float32, device="cpu", text_len=16)
    )
    state = adapter.prepare(*args2, **kwargs2)
    adapter.run(state, 0, 1)
    with pytest.raises(StageError, match="shape"):
        stage.flat_inputs(state)
    before = stage_fingerprint(stage)
    for p in model.parameters():
        p.add_(1.0)
    assert stage_fingerprint(stage) == before
    other, _ = build_stage(adapter, 1, 4, args, kwargs)
    assert stage_fingerprint(other) != before


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_exported_stages_fit_the_stages_a_pipeline_call_builds(family: str) -> None:
    """`accel export` builds stages from example inputs; the runtime from the pipeline's own call (which
    passes e.g. ``return_dict=False``). Every engine key must describe the same graph in both."""
    from accel.compile.engines import cfg_key, stage_jobs, window_key
    from accel.plan import build_plan

    pipe = build_pipeline(family)
    model = pipe.unet if family == "sdxl" else pipe.transformer
    plan = build_plan(
        model,
        source={"kind": "demo", "name": family},
        height=64,
        width=64,
        devices=2,
        warmup=0,
        repeat=1,
        count_flops=False,
    )
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(
                "a cat", num_inference_steps=1, guidance_scale=1.0, height=64, width=64, output_type="latent"
            )
    finally:
        handle.remove()
    args, kwargs = calls[0]
    adapter = adapt(model)
    exported = {job.key: stage_fingerprint(job.module) for job in stage_jobs(plan, model)}
    assert sum(key.startswith("window.") for key in exported) >= 2
    for k, stage in enumerate(plan.stages):
        for lo, hi in stage.segments:
            built, _ = build_stage(adapter, lo, hi, args, kwargs)
            key = window_key(k, lo, hi, 64, 64, 1)
            assert stage_fingerprint(built) == exported[key], key
    whole, _ = build_stage(adapter, 0, len(adapter.units), args, kwargs, whole=True)
    assert stage_fingerprint(whole) == exported[cfg_key(64, 64, 1)]
