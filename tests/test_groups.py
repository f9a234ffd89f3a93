"""CFG groups on 2k ranks: the layout, its fallbacks, and 4 real gloo processes against one process."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import FusedJointAttnProcessor2_0
from test_cfg_split import _count_collectives, _generate

import accel
from accel.models import DenoiserAdapter, adapt
from accel.partition import Partition, partition
from accel.plan import Plan
from accel.runtime.comm import Communicator
from accel.runtime.group_pipeline import GroupPipelineHook
from accel.runtime.groups import GroupLayout, LayoutError
from accel.runtime.guidance import HOOK_NAME, BatchSplit, CFGSplitHook, _batch_of, _map_output, slice_batch
from accel.runtime.sequence import UlyssesJointAttnProcessor, model_problem, size_problem
from accel.runtime.stages import PREDICTION, StageExecutor, first_tensor
from accel.settings import ScheduleSettings
from accel.testing import build_pipeline
from accel.wrapper import _note_window_guidance, _num_steps, find_denoiser

WORLD = 4
# (name, family, call kwargs); STEPS and GUIDANCE come from test_cfg_split's _generate.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("sdxl-b2", "sdxl", dict(prompt=["a red digit seven", "a blue cat"])),  # batch split in each group
    ("sdxl-b1", "sdxl", dict(prompt="a red digit seven")),  # each group's 2 ranks run the branch whole
    ("sd3-b1", "sd3", dict(prompt="a red digit seven")),  # image tokens sharded over each group
    ("sd3-b2", "sd3", dict(prompt=["a red digit seven", "a blue cat"])),  # batch split in each group
    ("sd3-b3", "sd3", dict(prompt=["a seven", "a cat", "a dog"])),  # 3 rows, tokens sharded over each group
    ("sd3-b1-g1", "sd3", dict(prompt="a red digit seven", guidance_scale=1.0)),  # tokens over all 4 ranks
]
CASES_BY_NAME = [(name, kwargs) for name, _family, kwargs in CASES]
# The group pipeline (each CFG group pipelines its branch over 2 stages): windows of the 4-step loop.
WINDOWS = {"prime-only": (2, 2), "window": (1, 3)}
PIPELINE_CALL = dict(prompt="a red digit seven")
# strategy="hybrid" through accel.wrap: a whole-branch first window step, then one pipelined step.
HYBRID_WINDOW = (1, 2)


def _denoiser(family: str) -> Any:
    pipe: Any = build_pipeline(family)
    return pipe.unet if family == "sdxl" else pipe.transformer


# -- the layout (pure) -----------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4, 6, 8])
def test_layout_maps_ranks_to_groups(world: int) -> None:
    layout = GroupLayout(world)
    k = world // 2
    assert layout.group_size == k
    assert layout.groups == (tuple(range(k)), tuple(range(k, world)))
    assert [layout.group_of(r) for r in range(world)] == [0] * k + [1] * k
    assert "CFG group 0 (unconditional)" in layout.describe()
    for size in layout.block_sizes:
        assert world % size == 0 and 1 < size < world
        for rank in range(world):
            block, stride = layout.block_of(size, rank), layout.stride_of(size, rank)
            assert rank in block and rank in stride and len(block) == size
            assert set(block) & set(stride) == {rank}
            assert block == tuple(range(block[0], block[0] + size))
    if k > 1:
        assert layout.blocks(k) == layout.groups


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(LayoutError, match="odd"):
        GroupLayout(3)
    with pytest.raises(LayoutError, match="block size 4 does not divide the world size 6"):
        GroupLayout(6).blocks(4)
    with pytest.raises(LayoutError, match="outside"):
        GroupLayout(4).group_of(4)
    with pytest.raises(RuntimeError, match="sub-groups were not created"):
        Communicator(rank=0, world_size=4).block(2)


@pytest.mark.parametrize("world", [2, 4, 6, 8])
@pytest.mark.parametrize("prompts", [1, 2, 3, 4, 6])
def test_cfg_batch_follows_the_groups(world: int, prompts: int) -> None:
    """The 2B CFG batch: unconditional rows on group 0, conditional on group 1, split gcd(B, k) ways."""
    layout = GroupLayout(world)
    k = layout.group_size
    split = BatchSplit.plan(2 * prompts, world)
    assert split.parts == 2 * math.gcd(prompts, k)
    for rank in range(world):
        rows = split.rows_of(rank)
        assert (rows.stop <= prompts) == (layout.group_of(rank) == 0)
        # The ranks of a block share its rows; a stride holds every row exactly once, in order.
        assert all(split.rows_of(r) == rows for r in layout.block_of(split.replicas, rank))
        stride = layout.stride_of(split.replicas, rank) if split.replicas > 1 else tuple(range(world))
        assert [i for r in stride for i in range(2 * prompts)[split.rows_of(r)]] == list(range(2 * prompts))


def test_sequence_parallel_needs_even_heads_and_tokens() -> None:
    sd3 = _denoiser("sd3")  # 4 heads, 8x8 = 64 image tokens at the default size
    assert model_problem(sd3) is None
    assert size_problem(sd3, 2, (16, 16)) is None and size_problem(sd3, 4, (16, 16)) is None
    message = size_problem(sd3, 3, (16, 16))
    assert message is not None and "4 attention heads, which 3 ranks cannot share evenly" in message
    message = size_problem(sd3, 2, (6, 6))  # 3x3 = 9 tokens
    assert message is not None and "9 image tokens" in message and "multiple of 2" in message
    unet_message = model_problem(_denoiser("sdxl"))
    assert unet_message is not None and "U-Net" in unet_message and "approximate" in unet_message
    sd3.transformer_blocks[0].attn.set_processor(FusedJointAttnProcessor2_0())
    fused = model_problem(sd3)
    assert fused is not None and "FusedJointAttnProcessor2_0" in fused


def test_six_ranks_with_four_heads_fall_back_to_whole_branches(caplog) -> None:
    """With 6 ranks (groups of 3) a 4-head DiT cannot be sharded: each rank runs its branch whole."""
    model = _denoiser("sd3")
    originals = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    hook = CFGSplitHook(Communicator(rank=4, world_size=6), owns_result=lambda: True)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK_NAME)
    installed = [m.processor for name, m in model.named_modules() if name in originals]
    assert all(isinstance(p, UlyssesJointAttnProcessor) for p in installed)
    split = BatchSplit.plan(2, 6)  # B = 1: one part per group, 3 ranks each
    assert (split.parts, split.replicas, split.rows_of(4)) == (2, 3, slice(1, 2))
    kwargs = dict(hidden_states=torch.zeros(1, 16, 16, 16), encoder_hidden_states=torch.zeros(1, 5, 32))
    with caplog.at_level(logging.WARNING, logger="accel.runtime.guidance"), torch.no_grad():
        assert hook.block_for(split, (), kwargs) is None
        assert hook.block_for(split, (), kwargs) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "accel.runtime.guidance"]
    assert len(warnings) == 1 and "3 ranks sharing 1 of 2 batch rows each run them whole" in warnings[0]
    assert "4 attention heads" in warnings[0]
    model._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
    assert all(m.processor is originals[name] for name, m in model.named_modules() if name in originals)


@pytest.mark.parametrize("devices", [4, 6, 8])
def test_even_world_sizes_are_accepted_for_both_strategies(devices: int) -> None:
    assert accel.AccelSettings(devices=devices, accelerator="cpu").world_size == devices
    hybrid = accel.AccelSettings(devices=devices, accelerator="cpu", strategy="hybrid")
    assert GroupLayout(hybrid.world_size).window_stages == devices // 2
    with pytest.raises(accel.SettingsError, match="is odd"):
        accel.AccelSettings(devices=devices + 1, accelerator="cpu", strategy="hybrid")
    assert [GroupLayout(w).window_stages for w in (1, 2)] == [1, 2]


def test_window_guidance_is_noted_as_ignored_on_groups(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="accel.wrapper"):
        _note_window_guidance(accel.AccelSettings(devices=4, strategy="hybrid"), 4, 2)  # the default
        assert not caplog.records
        _note_window_guidance(accel.AccelSettings(devices=4, strategy="hybrid", window_guidance="off"), 4, 2)
    (record,) = caplog.records
    assert "window_guidance='off' is ignored on 4 devices" in record.getMessage()


# -- 4 gloo processes ------------------------------------------------------------------------------


def _processors(model: torch.nn.Module) -> dict[str, Any]:
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def _worker(acc: accel.Accelerator, out_dir: str) -> None:
    comm = acc.comm
    assert comm is not None and comm.cfg_group is not None
    results: dict[str, Any] = {
        "layout": (acc.layout.group_of(acc.rank), comm.cfg_group.rank, comm.cfg_group.world_size),
    }
    pipes: dict[str, Any] = {family: build_pipeline(family) for family in ("sdxl", "sd3")}
    for family, pipe in pipes.items():  # before _count_collectives: P2POp refuses a patched dist.isend
        for name, window in WINDOWS.items():
            results[f"{family}-{name}"] = _run_group_pipeline(comm, pipe, window)
        results[f"{family}-hybrid"] = _run_hybrid(acc, pipe, family, out_dir)
    # Window segments routed through a stage runner (as compiled backends do), here one that runs them eagerly.
    runner = _EagerRunner()
    results["sdxl-window-runner"] = _run_group_pipeline(comm, pipes["sdxl"], WINDOWS["window"], runner)
    results["runner-keys"] = runner.keys
    before = _processors(pipes["sd3"].transformer)
    wrapped = {family: accel.wrap(pipe, accelerator=acc) for family, pipe in pipes.items()}
    results["sequence"] = {f: getattr(w.runtime, "sequence", None) is not None for f, w in wrapped.items()}
    counts = _count_collectives()
    for name, family, kwargs in CASES:
        steps: list[torch.Tensor] = []
        start = counts["n"]
        images = _generate(wrapped[family], kwargs, steps)
        results[name] = {
            "images": images,
            "steps": steps,
            "report": wrapped[family].last_report,
            "collectives": counts["n"] - start,
        }
    originals = {family: accel.unwrap(w) for family, w in wrapped.items()}
    after = _processors(originals["sd3"].transformer)
    results["restored"] = after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    start = counts["n"]
    results["after_unwrap"] = _generate(originals["sd3"], dict(CASES_BY_NAME)["sd3-b1"])
    results["after_unwrap_collectives"] = counts["n"] - start
    torch.save(results, f"{out_dir}/rank{acc.rank}.pt")


def _equal_plan(adapter: DenoiserAdapter, args: Any, kwargs: Any, rows: int) -> Partition:
    """Two stages of equal unit counts: deterministic on every rank, no profiling."""
    with torch.no_grad():
        edges = adapter.trace(*args, **kwargs)
    return partition([1.0] * len(adapter.units), 2, edges, adapter.family)


class _EagerRunner:
    """A stage runner that hands back each stage module itself (eager), noting the engine keys asked for."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def get(self, key: str, module: Any, example_inputs: Any, *, cache_key: Any = None) -> Any:
        self.keys.append(key)
        return module


def _run_hybrid(acc: accel.Accelerator, pipe: Any, family: str, out_dir: str) -> dict[str, Any]:
    """strategy="hybrid" through accel.wrap (plan profiled at the first call), with a plan file (SDXL), and
    with schedule="never"."""
    results: dict[str, Any] = {}
    wrapped = accel.wrap(
        pipe, accelerator=acc, strategy="hybrid", schedule=HYBRID_WINDOW, window_guidance="reference"
    )
    records: list[Any] = []
    wrapped.runtime.recorder = records.append
    steps: list[torch.Tensor] = []
    images = _generate(wrapped, PIPELINE_CALL, steps)
    plan = wrapped.runtime.plan
    results["window"] = {
        "images": images,
        "steps": steps,
        "report": wrapped.last_report,
        "records": records,
        "hook": type(wrapped.runtime).__name__,
        "plan": plan.to_dict(),
    }
    accel.unwrap(wrapped)
    if family == "sdxl":  # a 2-stage plan file is validated at wrap for groups of 2 and reproduces the run
        plan_file = f"{out_dir}/{family}.plan.json"
        if acc.rank == 0:
            plan.save(plan_file)
        acc.barrier()
        wrapped = accel.wrap(pipe, accelerator=acc, strategy="hybrid", schedule=HYBRID_WINDOW, plan=plan_file)
        results["plan-file"] = _generate(wrapped, PIPELINE_CALL)
        accel.unwrap(wrapped)
    wrapped = accel.wrap(pipe, accelerator=acc, strategy="hybrid", schedule="never")
    steps = []
    images = _generate(wrapped, PIPELINE_CALL, steps)
    results["never"] = {"images": images, "steps": steps, "report": wrapped.last_report}
    accel.unwrap(wrapped)
    return results


def _run_group_pipeline(
    comm: Communicator, pipe: Any, window: tuple[int, int], runner: Any = None
) -> dict[str, Any]:
    denoiser = find_denoiser(pipe)[1]
    hook = GroupPipelineHook(
        comm,
        owns_result=lambda: True,
        guided=lambda: bool(pipe.do_classifier_free_guidance),
        num_steps=lambda: _num_steps(pipe),
        schedule=ScheduleSettings.parse(window),
        get_plan=_equal_plan,
        runner=runner,
        vae_scale_factor=pipe.vae_scale_factor,
    )
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    registry.register_hook(hook, HOOK_NAME)
    records: list[Any] = []
    hook.recorder = records.append
    hook.reset_state(denoiser)
    steps: list[torch.Tensor] = []
    images = _generate(pipe, PIPELINE_CALL, steps)
    stats = hook.end_call()
    executor = hook._executor
    assert executor is not None and hook.plan is not None
    registry.remove_hook(HOOK_NAME, recurse=False)
    return {
        "images": images,
        "steps": steps,
        "records": records,
        "window": stats.window,
        "phase_steps": dict(stats.steps),
        "stage_units": [u for lo, hi in executor.segments[executor.stage] for u in range(lo, hi)],
        "segments": executor.segments,
        "compiled": sorted(executor.compiled),
        "vae_scale_factor": pipe.vae_scale_factor,
        "outgoing": sorted(f"{n}@{p}" for keys in executor.outgoing.values() for n, p in keys),
    }


class _EmulatedGroups(ModelHook):
    """One process doing what the group pipeline does on 2 x 2 ranks: each branch alone in CFG steps; in the
    window a whole-branch first step, then 2 stages per branch on the previous step's boundary tensors."""

    def __init__(self, window: tuple[int, int]) -> None:
        super().__init__()
        self.window = window
        self.calls = 0
        self.executors: list[list[StageExecutor]] = []

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        assert forward is not None
        step = self.calls
        self.calls += 1
        batch = _batch_of(args, kwargs)
        assert batch is not None
        half = batch // 2
        first, last = self.window
        outputs = []
        for branch in range(2):
            rows = slice(branch * half, (branch + 1) * half)
            b_args, b_kwargs = slice_batch(args, batch, rows), slice_batch(kwargs, batch, rows)
            if not first <= step <= last:
                outputs.append(forward(*b_args, **b_kwargs))
                continue
            if len(self.executors) < 2:
                adapter = adapt(module)
                stages = [s.segments for s in _equal_plan(adapter, b_args, b_kwargs, half).stages]
                edges = adapter.trace(*b_args, **b_kwargs)
                self.executors.append(
                    [
                        StageExecutor(
                            adapter, stages, edges, stage=j, peers=[0, 1], device=torch.device("cpu")
                        )
                        for j in range(2)
                    ]
                )
            stage_executors = self.executors[branch]
            if step == first:  # every stage's rank runs the branch whole, keeping its own inputs
                whole = [
                    ex.forward_capturing(b_args, b_kwargs, slot=(step + 1) % 2)[0] for ex in stage_executors
                ]
                outputs.append(whole[0])
                continue
            slot = step % 2
            results = [ex.compute(b_args, b_kwargs, slot=slot) for ex in stage_executors]
            for j, ex in enumerate(stage_executors):  # hand the boundary tensors on, after every stage ran
                for dest, keys in ex.outgoing.items():
                    for key in keys:
                        stage_executors[dest].slots[1 - slot][key].copy_(results[j][1][key])
            outputs.append(results[stage_executors[0].last_stage][0])
        sample = torch.cat([first_tensor(o) for o in outputs])
        return _map_output(outputs[0], lambda _t: sample)


def _emulate(pipe: Any, window: tuple[int, int]) -> torch.Tensor:
    denoiser = find_denoiser(pipe)[1]
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    registry.register_hook(_EmulatedGroups(window), "emulated")
    try:
        return _generate(pipe, PIPELINE_CALL)
    finally:
        registry.remove_hook("emulated", recurse=False)


def test_four_ranks_equal_one_process(tmp_path) -> None:
    """Exact modes against one process; the group pipeline against its one-process emulation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run with one thread each
    try:
        pipes: dict[str, Any] = {family: build_pipeline(family) for family in ("sdxl", "sd3")}
        reference = {name: _generate(pipes[family], kwargs) for name, family, kwargs in CASES}
        emulated = {
            f"{family}-{name}": _emulate(pipes[family], window)
            for family in pipes
            for name, window in WINDOWS.items()
        }
    finally:
        torch.set_num_threads(threads)
    accel.Accelerator(devices=WORLD, accelerator="cpu").launch(_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["layout"] for r in ranks] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    assert ranks[0]["sequence"] == {"sdxl": False, "sd3": True}
    n_blocks = len(pipes["sd3"].transformer.transformer_blocks)
    steps = len(ranks[0][CASES[0][0]]["steps"])
    # Per step: SD3 sharded over 2 ranks: 2 all-to-alls + 1 text all-gather per block, the patch
    # all-gather, the prediction all-gather over the stride; over all 4 ranks no prediction gather.
    per_step = {
        "sdxl-b2": 1,
        "sdxl-b1": 1,
        "sd3-b1": 3 * n_blocks + 2,
        "sd3-b2": 1,
        "sd3-b3": 3 * n_blocks + 2,
        "sd3-b1-g1": 3 * n_blocks + 1,
    }
    for name, _family, _kwargs in CASES:
        ref = reference[name]
        out = ranks[0][name]["images"]
        diff = (out - ref).abs().max().item()
        bound = 1e-5 + 1e-6 * ref.abs().max().item()  # the 2-rank bound: GEMM rounding at other shapes
        logging.getLogger(__name__).info("%s: max abs diff %.3g (bound %.3g)", name, diff, bound)
        assert diff <= bound, f"{name}: 4 ranks differ from one process by {diff} > {bound}"
        for r in ranks[1:]:
            assert torch.equal(r[name]["images"], out), f"{name}: ranks disagree"
            for s, (a, b) in enumerate(zip(r[name]["steps"], ranks[0][name]["steps"], strict=True)):
                assert torch.equal(a, b), f"{name}: latents differ across ranks at step {s}"
        for r in ranks:
            report = r[name]["report"]
            assert report.collectives == r[name]["collectives"] == steps * per_step[name], (name, report)
            assert report.denoiser_calls == report.split_calls == steps
    for r in ranks:
        assert r["restored"] and r["after_unwrap_collectives"] == 0
        assert torch.equal(r["after_unwrap"], reference["sd3-b1"])
    _check_group_pipeline(ranks, reference, emulated)
    _check_hybrid(ranks)


def _check_group_pipeline(ranks: list[dict], reference: dict, emulated: dict) -> None:
    log = logging.getLogger(__name__)
    for family in ("sdxl", "sd3"):
        exact = ranks[0][f"{family}-b1"]  # the CFG-group run of the same prompt
        for name, window in WINDOWS.items():
            key = f"{family}-{name}"
            run = ranks[0][key]
            for r in ranks[1:]:
                assert torch.equal(r[key]["images"], run["images"]), f"{key}: ranks disagree"
                for s, (a, b) in enumerate(zip(r[key]["steps"], run["steps"], strict=True)):
                    assert torch.equal(a, b), f"{key}: latents differ across ranks at step {s}"
            for s in range(window[0]):  # before the window: the CFG-group run, bit for bit
                assert torch.equal(run["steps"][s], exact["steps"][s]), f"{key}: step {s} differs"
            diff = (run["images"] - emulated[key]).abs().max().item()
            bound = 1e-5 + 1e-6 * emulated[key].abs().max().item()
            log.info(
                "%s: max abs diff vs one-process emulation %.3g (vs exact %.3g)",
                key,
                diff,
                (run["images"] - reference[f"{family}-b1"]).abs().max().item(),
            )
            # SDXL runs every branch whole in CFG steps, like the emulation: bit for bit. SD3 shards tokens.
            assert diff == 0 if family == "sdxl" else diff <= bound, (key, diff, bound)
            for rank, r in enumerate(ranks):
                result = r[key]
                assert result["window"] == window
                pipelined = window[1] - window[0] + 1
                assert result["phase_steps"] == {"cfg": len(run["steps"]) - pipelined, "pipeline": pipelined}
                for record in result["records"]:
                    in_window = window[0] < record.step <= window[1]  # the first window step runs whole
                    assert record.phase == ("pipeline" if window[0] <= record.step <= window[1] else "cfg")
                    if not in_window:
                        continue
                    assert list(record.units) == result["stage_units"], (key, rank, record)
                    sent = dict(record.sent)
                    boundary = sorted(k for k in sent if k != PREDICTION)
                    assert boundary == (result["outgoing"] if record.step < window[1] else [])
                    assert PREDICTION in sent
        if family == "sdxl":  # a window of one step is a whole-branch step: the exact run, bit for bit
            assert torch.equal(ranks[0][f"{family}-prime-only"]["images"], exact["images"])


def _check_hybrid(ranks: list[dict]) -> None:
    """strategy="hybrid" on 4 ranks selects the group pipeline; "never" is the CFG-group run, bit for bit."""
    first, last = HYBRID_WINDOW
    for family in ("sdxl", "sd3"):
        exact = ranks[0][f"{family}-b1"]  # strategy="cfg", same prompt and seed
        run = ranks[0][f"{family}-hybrid"]["window"]
        n_steps = len(exact["steps"])
        plan = Plan.from_dict(run["plan"])
        assert len(plan.stages) == 2 and plan.devices == 2
        for rank, r in enumerate(ranks):
            result = r[f"{family}-hybrid"]
            window = result["window"]
            assert window["hook"] == "GroupPipelineHook"
            assert Plan.from_dict(window["plan"]) == plan
            assert torch.equal(window["images"], run["images"]), f"{family}: ranks disagree"
            for s, (a, b) in enumerate(zip(window["steps"], run["steps"], strict=True)):
                assert torch.equal(a, b), f"{family}: latents differ across ranks at step {s}"
            report = window["report"]
            assert (report.strategy, report.window) == ("hybrid", HYBRID_WINDOW)
            assert report.steps == {"cfg": n_steps - (last - first + 1), "pipeline": last - first + 1}
            assert set(report.phase_seconds) == {"cfg", "pipeline"} and report.pipeline_bytes > 0
            # The first window step runs whole and still measures the branch gap; pipelined steps do not.
            assert [math.isnan(x) for x in report.rates] == [first < s <= last for s in range(n_steps)]
            for record in window["records"]:
                assert record.phase == ("pipeline" if first <= record.step <= last else "cfg")
                if first < record.step <= last:
                    assert record.units == tuple(plan.stages[rank % 2].units()), (family, rank, record)
                    assert [name for name, _ in record.sent] == [PREDICTION]  # last step: nothing to hand on
            never = result["never"]
            assert torch.equal(never["images"], exact["images"]), f"{family}: schedule='never' is not cfg"
            assert all(torch.equal(a, b) for a, b in zip(never["steps"], exact["steps"], strict=True))
            assert never["report"].window is None and never["report"].steps == {"cfg": n_steps, "pipeline": 0}
        for s in range(first):  # before the window: the CFG-group run, bit for bit
            assert torch.equal(run["steps"][s], exact["steps"][s]), f"{family}: step {s} differs"
        assert not torch.equal(run["images"], exact["images"]) and torch.isfinite(run["images"]).all()
    assert all(
        torch.equal(r["sdxl-hybrid"]["plan-file"], ranks[0]["sdxl-hybrid"]["window"]["images"]) for r in ranks
    )
    # Segments through a stage runner: every segment of both stages under its engine key, same output.
    for r in ranks:
        runner_run, eager_run = r["sdxl-window-runner"], r["sdxl-window"]
        assert torch.equal(runner_run["images"], eager_run["images"])
        assert runner_run["compiled"] == sorted(seg for segs in runner_run["segments"] for seg in segs)
        height, width = (n * runner_run["vae_scale_factor"] for n in runner_run["images"].shape[-2:])
        assert r["runner-keys"] == [
            f"window.s{k}.u{lo}-{hi}.{height}x{width}.b1"
            for k, segs in enumerate(runner_run["segments"])
            for lo, hi in segs
        ]
