"""Edge cases of the pipelined window on 2 real gloo processes and in-process: compiled window segments
under another LoRA scale, extra denoiser calls per step (skip-layer guidance), 3-branch batches
(perturbed-attention guidance), and window steps against an oracle of one-step-stale activations."""

from __future__ import annotations

from typing import Any

import torch

import accel
from accel.compile.runner import StageRunner
from accel.models import InputShape, adapt
from accel.runtime.stages import call_key, compile_segments, run_segment
from accel.testing import build_pipeline

HEIGHT = WIDTH = 64


def _sd3_call(pipe: Any, *, steps: int, **call: Any) -> torch.Tensor:
    kwargs: dict[str, Any] = dict(prompt="a handwritten seven", guidance_scale=5.0)
    kwargs.update(call)
    return pipe(
        num_inference_steps=steps,
        height=HEIGHT,
        width=WIDTH,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(7),
        **kwargs,
    ).images


# -- compiled window segments follow what their graph depends on -------------------------------------------
def _lora_worker(acc: accel.Accelerator, out_dir: str) -> None:
    pipe = build_pipeline("sd3")
    results: dict[str, Any] = {}
    for name, runner in (("eager", None), ("compiled", StageRunner("eager"))):
        wrapped = accel.wrap(pipe, accelerator=acc, schedule=(2, 3), window_guidance="cached")
        wrapped.runtime.runner = runner  # the window's segments run as (eager-backend) stage callables
        results[name] = [
            _sd3_call(wrapped, steps=5, joint_attention_kwargs={"scale": scale}) for scale in (1.0, 0.5)
        ]
        results[f"{name}-windows"] = wrapped.last_report.window
        accel.unwrap(wrapped)
    torch.save(results, f"{out_dir}/rank{acc.rank}.pt")


def test_compiled_window_segments_follow_the_lora_scale(tmp_path) -> None:
    """A second call at the same shape with another LoRA scale gets segments built for it (it crashed
    on the first call's segments, which were cached by tensor shapes only)."""
    accel.Accelerator(devices=2, accelerator="cpu", strategy="hybrid").launch(_lora_worker, str(tmp_path))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert results["compiled-windows"] == results["eager-windows"] == (2, 3)
        for compiled, eager in zip(results["compiled"], results["eager"], strict=True):
            torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)


def test_a_state_a_compiled_segment_was_not_built_for_runs_eagerly() -> None:
    """The safety net under the key: a segment refusing a state (StageError) falls back to eager, as the
    whole-denoiser path does, instead of failing the call."""
    model = build_pipeline("sd3").transformer
    adapter = adapt(model)
    shape = InputShape(batch=1, height=HEIGHT, width=WIDTH, dtype=torch.float32, device=torch.device("cpu"))
    args, kwargs = adapter.example_inputs(shape)
    one = {**kwargs, "joint_attention_kwargs": {"scale": 1.0}}
    half = {**kwargs, "joint_attention_kwargs": {"scale": 0.5}}
    assert call_key(args, one) != call_key(args, half)
    assert call_key(args, one) == call_key(args, {**kwargs, "joint_attention_kwargs": {"scale": 1.0}})
    n = len(adapter.units)
    with torch.no_grad():
        compiled = compile_segments(StageRunner("eager"), adapter, [[(0, 2)], [(2, n)]], args, one, shape)
        assert set(compiled) == {(0, 2), (2, n)}
        state = adapter.prepare(*args, **half)
        out = run_segment(adapter, state.copy(), 0, 2, compiled)
        expected = adapter.run(adapter.prepare(*args, **half), 0, 2)
    assert (0, 2) not in compiled and (2, n) in compiled  # later steps run it eagerly without asking again
    for name, tensor in adapter.state_tensors(expected, 2).items():
        assert torch.equal(adapter.state_tensors(out, 2)[name], tensor), name
