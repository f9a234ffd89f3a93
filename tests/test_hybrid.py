"""The hybrid runtime on 2 real gloo processes: CFG split outside the window, the 2-stage pipeline inside."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import accel
from accel.plan import Plan, PlanError
from accel.runtime.pipeline import PREDICTION
from accel.runtime.schedule import window_for
from accel.settings import ScheduleSettings
from accel.testing import build_pipeline

FAMILIES = ("sdxl", "sd3")
STEPS = 8
GUIDANCE = 5.0
WINDOW = (3, 5)
MODES = ("reference", "cached", "off")
EXTRA: dict[str, dict[str, Any]] = {
    "b2-neg": dict(prompt=["a seven", "a cat"], negative_prompt=["blurry", "dark"]),
    "g1": dict(guidance_scale=1.0),
}

# (name, per-pipeline settings)
CASES: list[tuple[str, dict[str, Any]]] = [
    ("never", dict(schedule="never")),
    *[(f"window-{m}", dict(schedule=WINDOW, window_guidance=m)) for m in MODES],
    # Adaptive rule with a threshold every slope meets: tau1 = L = 2, window 3..4 (k = 2).
    ("adaptive", dict(schedule=dict(mode="adaptive", lookback=2, eps=1e9, k=2, tau_cap=6))),
    # Pipeline from step L = 3 to the end of the loop.
    ("always", dict(schedule=dict(mode="always", lookback=3), window_guidance="off")),
]


def _generate(pipe: Any, **call: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    steps: list[torch.Tensor] = []

    def on_step_end(_pipe, step, timestep, cb_kwargs):
        steps.append(cb_kwargs["latents"].clone())
        return cb_kwargs

    kwargs: dict[str, Any] = dict(prompt="a red digit seven", guidance_scale=GUIDANCE)
    kwargs.update(call)
    images = pipe(
        num_inference_steps=STEPS,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(1234),
        callback_on_step_end=on_step_end,
        **kwargs,
    ).images
    return images, steps


def _worker(acc: accel.Accelerator, out_dir: str) -> None:
    """Both families in one launch: a gloo start-up costs ~5 s on 2 CPU cores, paid once, not per family.
    Each family writes to its own subfolder, as a launch of its own would."""
    for family in FAMILIES:
        _run_family(acc, family, f"{out_dir}/{family}")


def _run_family(acc: accel.Accelerator, family: str, out_dir: str) -> None:
    pipe = build_pipeline(family)
    results: dict[str, Any] = {}
    cfg = accel.wrap(pipe, accelerator=acc, strategy="cfg")
    results["cfg"] = {"out": _generate(cfg)}
    for extra, call in EXTRA.items():
        results[f"cfg-{extra}"] = _generate(cfg, **call)
    accel.unwrap(cfg)
    # Two prompts with negative prompts (window), and guidance 1 (no CFG batch: nothing to pipeline).
    wrapped = accel.wrap(pipe, accelerator=acc, schedule=WINDOW, window_guidance="reference")
    for extra, call in EXTRA.items():
        results[f"hybrid-{extra}"] = (_generate(wrapped, **call), wrapped.last_report)
    accel.unwrap(wrapped)
    plan_file = f"{out_dir}/plan.json"
    for name, overrides in [
        *CASES,
        ("plan-file", dict(schedule=WINDOW, window_guidance="cached", plan=plan_file)),
    ]:
        wrapped = accel.wrap(pipe, accelerator=acc, **overrides)
        records: list[Any] = []
        wrapped.runtime.recorder = records.append
        out = _generate(wrapped)
        plan = wrapped.runtime.plan
        mode = wrapped.runtime.window_guidance
        results[name] = {"out": out, "records": records, "report": wrapped.last_report, "mode": mode}
        if plan is not None:
            results[name]["plan"] = plan.to_dict()
            if name == "window-cached" and acc.rank == 0:
                plan.save(plan_file)
        acc.barrier()
        accel.unwrap(wrapped)
    try:  # a missing plan file is refused at wrap time on every rank
        accel.wrap(pipe, accelerator=acc, plan=f"{out_dir}/missing.plan.json")
    except PlanError as exc:
        results["missing-plan"] = str(exc)
    torch.save(results, f"{out_dir}/rank{acc.rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Each family's results on ranks 0 and 1, from one launch of 2 gloo processes."""
    out = tmp_path_factory.mktemp("hybrid")
    for family in FAMILIES:
        (out / family).mkdir()
    accel.Accelerator(devices=2, accelerator="cpu", strategy="hybrid").launch(_worker, str(out))
    return {
        family: [torch.load(out / family / f"rank{r}.pt", weights_only=False) for r in range(2)]
        for family in FAMILIES
    }


def _check(family: str, ranks: list[dict]) -> None:
    ref_images, ref_steps = ranks[0]["cfg"]["out"]
    for name, _ in [*CASES, ("plan-file", {})]:
        (img0, steps0), (img1, steps1) = ranks[0][name]["out"], ranks[1][name]["out"]
        assert torch.equal(img0, img1), f"{family}/{name}: ranks disagree"
        for s, (a, b) in enumerate(zip(steps0, steps1, strict=True)):
            assert torch.equal(a, b), f"{family}/{name}: latents differ across ranks at step {s}"
        report = ranks[0][name]["report"]
        window = report.window
        first = window[0] if window is not None else STEPS
        for s in range(first):  # before the window: bit for bit the CFG split run
            assert torch.equal(steps0[s], ref_steps[s]), f"{family}/{name}: step {s} differs from CFG split"
        if window is None:
            assert torch.equal(img0, ref_images)
        else:
            assert not torch.equal(img0, ref_images)
            assert torch.isfinite(img0).all()
    for rank in ranks:
        (b2, b2_steps), b2_report = rank["hybrid-b2-neg"]
        assert b2_report.window == WINDOW and b2.shape[0] == 2
        for s in range(WINDOW[0]):
            assert torch.equal(b2_steps[s], rank["cfg-b2-neg"][1][s])
        assert torch.equal(b2, ranks[0]["hybrid-b2-neg"][0][0])
        (g1, _), g1_report = rank["hybrid-g1"]
        assert g1_report.window is None and g1_report.steps == {"cfg": 0, "pipeline": 0}
        assert torch.equal(g1, rank["cfg-g1"][0])
    assert all("no plan file" in r["missing-plan"] for r in ranks)
    # schedule="never": CFG split, bit for bit, and no plan needed.
    assert ranks[0]["never"]["report"].window is None and "plan" not in ranks[0]["never"]
    for name in ("window-reference", "window-cached", "window-off", "plan-file"):
        _check_window(family, name, ranks, WINDOW)
    _check_window(family, "always", ranks, (3, STEPS - 1))
    assert (ranks[0]["always"]["report"].tau1, ranks[0]["always"]["report"].tau2) == (2, STEPS - 1)
    # Adaptive: the runtime's window is the pure rule's on the rates it measured (r_i >= 0 only
    # qualifies on a falling or flat curve, so tau1 = 2 unless the tiny model's gap grows at step 2).
    adaptive = ranks[0]["adaptive"]["report"]
    settings = ScheduleSettings.parse(dict(CASES)["adaptive"]["schedule"]).resolve(
        "unet" if family == "sdxl" else "dit"
    )
    rates = list(adaptive.rates)
    assert adaptive.tau1 is not None and 2 <= adaptive.tau1 <= 6
    assert window_for(settings, rates[: adaptive.tau1 + 1], STEPS) == adaptive.window
    assert adaptive.tau2 == adaptive.tau1 + 2
    assert adaptive.window == (adaptive.tau1 + 1, min(adaptive.tau1 + 2, STEPS - 1))
    _check_window(family, "adaptive", ranks, adaptive.window)
    # The plan file reproduces the in-memory plan's run exactly.
    assert torch.equal(ranks[0]["plan-file"]["out"][0], ranks[0]["window-cached"]["out"][0])
    # The three window guidance modes differ from each other.
    outs = [ranks[0][f"window-{m}"]["out"][0] for m in MODES]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def _check_window(family: str, name: str, ranks: list[dict], window: tuple[int, int]) -> None:
    plan = Plan.from_dict(ranks[0][name]["plan"])
    assert plan == Plan.from_dict(ranks[1][name]["plan"])
    owner = plan.stage_of_units()
    n_units = len(owner)
    last_stage = owner[-1]
    for rank, result in enumerate(ranks):
        stage = last_stage if rank == 1 else 1 - last_stage  # the conditional rank produces the prediction
        report = result[name]["report"]
        assert report.window == window, (family, name, report.window)
        assert report.steps == {
            "cfg": STEPS - (window[1] - window[0] + 1),
            "pipeline": window[1] - window[0] + 1,
        }
        assert len(report.rates) == STEPS
        for s, rate in enumerate(report.rates):
            in_window = window[0] <= s <= window[1]
            assert math.isnan(rate) == in_window, (family, name, s, rate)
        records = result[name]["records"]
        assert [r.step for r in records] == list(range(STEPS))
        out_edges = [e for e in plan.boundary if owner[e.producer] == stage and owner[e.consumer] != stage]
        boundary_bytes = sum(e.nbytes for e in out_edges)
        pipelined_bytes = 0
        for record in records:
            assert record.rank == rank
            sent = dict(record.sent)
            if not window[0] <= record.step <= window[1]:
                assert record.phase == "cfg" and record.units == tuple(range(n_units))
                assert list(sent) == [PREDICTION]
                continue
            assert record.phase == "pipeline"
            assert record.units == tuple(plan.stages[stage].units()), (family, name, rank, record)
            boundary = {k: v for k, v in sent.items() if k not in (PREDICTION, "handover")}
            if record.step < window[1]:
                assert sorted(boundary) == sorted(f"{e.name}@{e.producer}" for e in out_edges)
                assert sum(boundary.values()) == boundary_bytes
            else:
                assert boundary == {}  # nothing to hand on after the last window step
            assert (PREDICTION in sent) == (rank == 1)
            pipelined_bytes += sum(sent.values())
        assert report.pipeline_bytes == pipelined_bytes
        # The last CFG step kept what the window needs: reference: each rank its own stage's inputs, from
        # its own branch; cached/off: rank 1 (conditional) both stages' inputs, rank 0 none (it receives
        # its stage's inputs from rank 1 in the first window step, counted as "handover").
        captured = set(records[window[0] - 1].captured)
        inputs = [
            {
                f"{e.name}@{e.producer}"
                for e in plan.boundary
                if owner[e.consumer] == k and owner[e.producer] != k
            }
            for k in range(2)
        ]
        reference = result[name]["mode"] == "reference"
        if reference:
            assert captured == inputs[stage]
        elif rank == 1:
            assert captured == inputs[0] | inputs[1]
        else:
            assert captured == set()
        handover = dict(records[window[0]].sent).get("handover", 0)
        if rank == 1 and not reference:
            assert handover == sum(e.nbytes for e in plan.boundary if owner[e.consumer] == 1 - stage)
        else:
            assert handover == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid(family: str, results: dict[str, list[dict]]) -> None:
    _check(family, results[family])


def test_settings_errors_before_any_process_starts() -> None:
    with pytest.raises(accel.SettingsError, match="world size 3 .* is odd"):
        accel.Accelerator(devices=3, accelerator="cpu", strategy="hybrid")
    acc = accel.Accelerator(devices=1, accelerator="cpu")
    with pytest.raises(accel.SettingsError, match="cannot change per pipeline"):
        acc.wrap(object(), devices=2)
    with pytest.raises(accel.SettingsError, match="schedule"):
        acc.wrap(object(), strategy="hybrid", schedule=(0, 3))
