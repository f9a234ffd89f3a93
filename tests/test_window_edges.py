"""Edge cases of the pipelined window on 2 real gloo processes and in-process: compiled window segments
under another LoRA scale, extra denoiser calls per step (skip-layer guidance), 3-branch batches
(perturbed-attention guidance), and window steps against an oracle of one-step-stale activations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import accel
from accel.compile.runner import StageRunner
from accel.models import InputShape, adapt
from accel.plan import Plan
from accel.runtime.guidance import slice_batch
from accel.runtime.schedule import window_for
from accel.runtime.stages import call_key, compile_segments, first_tensor, run_segment, run_stage
from accel.settings import ScheduleSettings
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


# -- one launch of 2 gloo processes for the module's three distributed tests ---------------------------------
WORKLOADS = ("lora", "extra-calls", "oracle")


def _worker(acc: accel.Accelerator, out_dir: str) -> None:
    """The three tests' workloads in one launch: a gloo start-up costs ~5 s on 2 CPU cores, paid once, not
    per test. Each workload builds its own pipelines and writes to its own subfolder, as a launch of its own
    would."""
    workers = {"lora": _lora_worker, "extra-calls": _extra_calls_worker, "oracle": _oracle_worker}
    for name in WORKLOADS:
        workers[name](acc, f"{out_dir}/{name}")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding each workload's subfolder of ``rank{r}.pt`` files."""
    out = tmp_path_factory.mktemp("window-edges")
    for name in WORKLOADS:
        (out / name).mkdir()
    accel.Accelerator(devices=2, accelerator="cpu", strategy="hybrid").launch(_worker, str(out))
    return out


# -- compiled window segments follow what their graph depends on -------------------------------------------
def _lora_worker(acc: accel.Accelerator, out_dir: str) -> None:
    pipe = build_pipeline("sd3")
    results: dict[str, Any] = {}
    plan: str | None = None  # the second run uses the first one's plan: the same stage cut
    for name, runner in (("eager", None), ("compiled", StageRunner("eager"))):
        wrapped = accel.wrap(pipe, accelerator=acc, schedule=(2, 3), window_guidance="cached", plan=plan)
        wrapped.runtime.runner = runner  # the window's segments run as (eager-backend) stage callables
        results[name] = [
            _sd3_call(wrapped, steps=5, joint_attention_kwargs={"scale": scale}) for scale in (1.0, 0.5)
        ]
        results[f"{name}-windows"] = wrapped.last_report.window
        if plan is None:
            plan = f"{out_dir}/plan.json"
            if acc.rank == 0:
                wrapped.runtime.plan.save(plan)
            acc.barrier()
        accel.unwrap(wrapped)
    torch.save(results, f"{out_dir}/rank{acc.rank}.pt")


def test_compiled_window_segments_follow_the_lora_scale(launched: Path) -> None:
    """A second call at the same shape with another LoRA scale gets segments built for it (it crashed
    on the first call's segments, which were cached by tensor shapes only)."""
    for rank in range(2):
        results = torch.load(launched / "lora" / f"rank{rank}.pt", weights_only=False)
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


# -- several denoiser calls per step, and 3-branch batches ---------------------------------------------------
STEPS = 8
WINDOW = (3, 5)
SLG = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.9)
PAG = dict(pag_scale=3.0)
ONE, TWO = "a handwritten seven", ["a handwritten seven", "a handwritten two"]
#: (name, pipeline, call): SD3 with skip-layer guidance (an extra denoiser call on the conditional rows in
#: steps 1-7), and perturbed-attention guidance (a batch of 3B rows: uncond, cond, perturbed).
EXTRA_CALL_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("slg-b1", "sd3", dict(prompt=ONE, **SLG)),
    ("slg-b2", "sd3", dict(prompt=TWO, **SLG)),
    ("pag-sdxl-b1", "sdxl-pag", dict(prompt=ONE, **PAG)),
    ("pag-sdxl-b2", "sdxl-pag", dict(prompt=TWO, **PAG)),
    ("pag-sd3-b2", "sd3-pag", dict(prompt=TWO, **PAG)),
]
HYBRID_CASES = ("slg-b1", "slg-b2", "pag-sdxl-b2")


def _pipelines() -> dict[str, Any]:
    from diffusers import StableDiffusion3PAGPipeline, StableDiffusionXLPAGPipeline

    sd3, sdxl = build_pipeline("sd3"), build_pipeline("sdxl")
    return {
        "sd3": sd3,
        "sdxl-pag": StableDiffusionXLPAGPipeline.from_pipe(sdxl, pag_applied_layers=["mid"]),
        "sd3-pag": StableDiffusion3PAGPipeline.from_pipe(sd3, pag_applied_layers=["blocks.1"]),
    }


def _run(pipe: Any, call: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    steps: list[torch.Tensor] = []

    def on_step_end(_pipe, step, timestep, cb_kwargs):
        steps.append(cb_kwargs["latents"].clone())
        return cb_kwargs

    images = pipe(
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        height=HEIGHT,
        width=WIDTH,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(1234),
        callback_on_step_end=on_step_end,
        **call,
    ).images
    return images, steps


def _extra_calls_worker(acc: accel.Accelerator, out_dir: str) -> None:
    pipes = _pipelines()
    results: dict[str, Any] = {}
    for name, which, call in EXTRA_CALL_CASES:
        wrapped = accel.wrap(pipes[which], accelerator=acc, strategy="cfg")
        results[f"cfg/{name}"] = (_run(wrapped, call), wrapped.last_report)
        accel.unwrap(wrapped)
        if name not in HYBRID_CASES:
            continue
        wrapped = accel.wrap(pipes[which], accelerator=acc, schedule=WINDOW, window_guidance="cached")
        records: list[Any] = []
        wrapped.runtime.recorder = records.append
        results[f"hybrid/{name}"] = (_run(wrapped, call), wrapped.last_report, records)
        accel.unwrap(wrapped)
    torch.save(results, f"{out_dir}/rank{acc.rank}.pt")


def test_extra_denoiser_calls_and_three_branch_batches(launched: Path) -> None:
    """Skip-layer guidance and perturbed-attention guidance are exact with strategy="cfg", and a step of
    the schedule is a pipeline step: skip-layer guidance's extra call per step neither moves the window,
    nor feeds the rate rule, nor enters the window; PAG's 3-branch batch is never cut mid-branch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run with one thread each
    try:
        pipes = _pipelines()
        reference = {name: _run(pipes[which], call)[0] for name, which, call in EXTRA_CALL_CASES}
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(launched / "extra-calls" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, _, call in EXTRA_CALL_CASES:
        (images, steps), report = ranks[0][f"cfg/{name}"]
        assert torch.equal(images, ranks[1][f"cfg/{name}"][0][0]), f"{name}: ranks disagree"
        bound = 1e-5 + 1e-6 * reference[name].abs().max().item()
        diff = (images - reference[name]).abs().max().item()
        assert diff <= bound, (
            f"{name}: strategy='cfg' differs from the unwrapped pipeline by {diff} > {bound}"
        )
        slg_calls = STEPS - 1 if "skip_guidance_layers" in call else 0
        assert report.denoiser_calls == STEPS + slg_calls, (name, report.denoiser_calls)
    for name in HYBRID_CASES:
        for rank in ranks:
            (images, steps), report, records = rank[f"hybrid/{name}"]
            cfg_steps = rank[f"cfg/{name}"][0][1]
            assert torch.equal(images, ranks[0][f"hybrid/{name}"][0][0]), f"{name}: ranks disagree"
            if name.startswith("pag"):
                # Run whole on every rank: exact, no window (no rank can run a part of a PAG batch alone).
                assert report.window is None and report.steps == {"cfg": 0, "pipeline": 0}, report
                assert torch.equal(images, rank[f"cfg/{name}"][0][0])
                continue
            assert report.window == WINDOW, (name, report.window)
            pipelined = WINDOW[1] - WINDOW[0] + 1
            assert report.steps == {"cfg": STEPS - pipelined, "pipeline": pipelined}, report.steps
            assert [r.step for r in records] == list(range(STEPS))
            assert [r.phase for r in records] == [
                "pipeline" if WINDOW[0] <= s <= WINDOW[1] else "cfg" for s in range(STEPS)
            ]
            assert len(report.rates) == STEPS
            for s, rate in enumerate(report.rates):
                assert (WINDOW[0] <= s <= WINDOW[1]) == (rate != rate), (name, s, rate)  # NaN in the window
            for s in range(WINDOW[0]):  # before the window: bit for bit the CFG split run
                assert torch.equal(steps[s], cfg_steps[s]), f"{name}: step {s} differs from CFG split"
            assert torch.isfinite(images).all() and not torch.equal(images, rank[f"cfg/{name}"][0][0])


# -- window steps against an oracle of exactly one-step-stale activations ------------------------------------
def _clone(tree: Any) -> Any:
    from accel.tree import map_tree

    return map_tree(tree, lambda _path, leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf)


def _oracle_worker(acc: accel.Accelerator, out_dir: str) -> None:
    pipe = build_pipeline("sdxl")
    calls: list[Any] = []

    def record(_module, args, kwargs, output):
        calls.append((_clone(args), _clone(kwargs), first_tensor(output).clone()))

    handle = pipe.unet.register_forward_hook(record, with_kwargs=True)
    wrapped = accel.wrap(pipe, accelerator=acc, schedule=WINDOW, window_guidance="off")
    _run(wrapped, dict(prompt=ONE))
    results: dict[str, Any] = {"calls": calls, "plan": wrapped.runtime.plan.to_dict()}
    results["report"] = wrapped.last_report
    accel.unwrap(wrapped)
    handle.remove()
    # The default adaptive rule at 16 steps: its constants scaled to the step count.
    wrapped = accel.wrap(pipe, accelerator=acc)
    pipe_call = dict(prompt=ONE, num_inference_steps=16, guidance_scale=5.0, height=HEIGHT, width=WIDTH)
    wrapped(**pipe_call, output_type="latent", generator=torch.Generator("cpu").manual_seed(3))
    results["adaptive16"] = wrapped.last_report
    accel.unwrap(wrapped)
    torch.save(results, f"{out_dir}/rank{acc.rank}.pt")


def _exact_boundary(adapter: Any, edges: list[Any], owner: list[int], args: Any, kwargs: Any) -> dict:
    """Every tensor that crosses a stage boundary in an exact forward, by ``(name, producer)``."""
    state = adapter.prepare(*args, **kwargs)
    found = {}
    cuts = [0] + [u for u in range(1, len(owner)) if owner[u] != owner[u - 1]] + [len(owner)]
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        state = adapter.run(state, lo, hi)
        named = adapter.state_tensors(state, hi)
        for e in edges:
            if lo <= e.producer < hi and owner[e.consumer] != owner[e.producer]:
                found[(e.name, e.producer)] = named[e.name]
    return found


def test_window_steps_equal_an_oracle_of_one_step_stale_activations(launched: Path) -> None:
    """Each window step's prediction is what the two stages compute on this step's inputs and the
    boundary tensors the other stage produced exactly one step earlier (the first window step: those of
    the last CFG step). Reading a wrong receive slot (fresh, two steps old, or never written) fails it."""
    ranks = [torch.load(launched / "oracle" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    plan = Plan.from_dict(ranks[0]["plan"])
    stages = [sorted(tuple(seg) for seg in stage.segments) for stage in plan.stages]
    owner = plan.stage_of_units()
    calls = ranks[0]["calls"]
    assert len(calls) == STEPS and ranks[0]["report"].window == WINDOW
    model = build_pipeline("sdxl").unet
    adapter = adapt(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            cond = [(slice_batch(a, 2, slice(1, 2)), slice_batch(k, 2, slice(1, 2))) for a, k, _ in calls]
            edges = adapter.trace(*cond[0][0], **cond[0][1])
            stale = _exact_boundary(adapter, edges, owner, *cond[WINDOW[0] - 1])
            for step in range(WINDOW[0], WINDOW[1] + 1):
                fresh: dict[Any, torch.Tensor] = {}
                for k, segments in enumerate(stages):
                    initial = adapter.prepare(*cond[step][0], **cond[step][1])
                    state, produced, _ = run_stage(adapter, segments, edges, owner, initial, stale)
                    fresh.update(produced)
                    if k == owner[-1]:
                        oracle = first_tensor(adapter.finish(state))
                exact = first_tensor(model(*cond[step][0], **cond[step][1]))
                for rank in ranks:
                    got = rank["calls"][step][2]
                    assert torch.equal(got[:1], got[1:]), (
                        "window_guidance='off' returns eps_c for both branches"
                    )
                    err = (got[1:] - oracle).abs().max().item()
                    assert err <= 1e-5 * oracle.abs().max().item(), (step, rank is ranks[1], err)
                # The oracle is not the exact prediction: staleness shows (so the check can fail).
                assert (exact - oracle).abs().max().item() > 1e-3 * oracle.abs().max().item(), step
                stale = fresh
    finally:
        torch.set_num_threads(threads)
    # The default rule at 16 steps decides with its constants scaled to 16 steps.
    report = ranks[0]["adaptive16"]
    resolved = ScheduleSettings().resolve("unet", 16)
    assert report.window == window_for(resolved, list(report.rates)[: (report.tau1 or 16) + 1], 16)
    assert report.window is None or report.window[1] <= 14, report.window
