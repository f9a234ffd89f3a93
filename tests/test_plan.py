"""Plan files: build, save/load round trip, refusal of mismatched or corrupt plans, ``accel plan``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from accel.cli.app import app
from accel.models import adapt
from accel.plan import (
    SCHEMA_VERSION,
    Plan,
    PlanError,
    build_plan,
    config_hash,
    load_plan,
    weights_fingerprint,
)
from accel.profile import profile_units
from accel.testing import tiny_sd3_pipeline, tiny_sdxl_pipeline

SOURCE = {"kind": "demo", "name": "sdxl"}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Two OpenMP threads on a shared 2-core machine stall; one thread is faster and steadier here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return tiny_sdxl_pipeline().unet


@pytest.fixture(scope="module")
def plan(unet: torch.nn.Module) -> Plan:
    return build_plan(unet, source=SOURCE, height=128, width=128, devices=2, warmup=1, repeat=2)


def test_build_plan_records_model_stages_and_boundary(plan: Plan, unet: torch.nn.Module) -> None:
    assert plan.schema_version == SCHEMA_VERSION
    assert plan.model_class == "UNet2DConditionModel" and plan.family == "unet"
    assert plan.config_hash == config_hash(unet) and plan.weights_fingerprint == weights_fingerprint(unet)
    assert plan.dtype == "fp32" and plan.device_type == "cpu"
    assert plan.resolutions == ((128, 128),) and plan.batches == (1,) and plan.devices == 2
    assert len(plan.stages) == 2 and plan.layout in ("onion", "chain")
    assert sorted(i for s in plan.stages for i in s.units()) == list(range(len(plan.units)))
    assert all(u.ms > 0 and u.flops > 0 for u in plan.units)
    assert plan.units[0].name == "conv_in" and plan.units[0].module_paths == ("conv_in",)
    assert "conv_in" in plan.stages[plan.stage_of_units()[0]].module_paths
    owner = plan.stage_of_units()
    assert plan.boundary and all(owner[e.producer] != owner[e.consumer] for e in plan.boundary)
    assert plan.bytes_per_step == sum(e.nbytes for e in plan.boundary)
    costs = [s.cost_ms for s in plan.stages]
    assert plan.balance == pytest.approx(max(costs) / (sum(costs) / len(costs)))
    assert plan.profile["timer"] == "perf_counter" and plan.strategy and plan.backend == "eager"


def test_round_trip_and_atomic_save(plan: Plan, tmp_path: Path) -> None:
    path = plan.save(tmp_path / "sub" / "p.json")
    assert load_plan(path) == plan
    data = json.loads(path.read_text())
    assert list(data)[0] == "schema_version" and isinstance(data["stages"], list)
    assert data["source"] == SOURCE and data["stages"][0]["segments"][0] == list(plan.stages[0].segments[0])
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]  # no temp file left behind
    broken = dataclasses.replace(plan, schedule={"not json": object()})
    with pytest.raises(TypeError):
        broken.save(tmp_path / "sub" / "q.json")
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]


def test_validate_for_accepts_the_same_model_and_shape(plan: Plan, unet: torch.nn.Module) -> None:
    plan.validate_for(unet, height=128, width=128, batch=1, devices=2, dtype=torch.float32)
    plan.validate_for(unet)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        (dict(height=256, width=256), r"resolution 256x256 is not in the plan's buckets \(128x128\)"),
        (dict(batch=3), r"batch 3 is not in the plan's batch buckets \[1\]"),
        (dict(devices=4), "the plan has 2 stages for 2 devices, this run has 4"),
        (dict(dtype="fp16"), "profiled in fp32, this run uses fp16"),
    ],
)
def test_mismatched_shape_devices_or_dtype_is_refused(
    plan: Plan, unet: torch.nn.Module, kwargs: dict, reason: str
) -> None:
    with pytest.raises(PlanError, match=reason) as info:
        plan.validate_for(unet, **kwargs)
    assert "re-run `accel plan --demo sdxl" in str(info.value)


def test_other_model_or_changed_weights_is_refused(plan: Plan, unet: torch.nn.Module) -> None:
    with pytest.raises(
        PlanError, match="plan is for a UNet2DConditionModel, the model is a SD3Transformer2DModel"
    ):
        plan.validate_for(tiny_sd3_pipeline(with_t5=False).transformer)
    other = tiny_sdxl_pipeline(seed=1).unet
    assert config_hash(other) == plan.config_hash
    with pytest.raises(PlanError, match="weights differ"):
        plan.validate_for(other)
    plan.validate_for(other, check_weights=False)
    changed = type(unet).from_config({**unet.config, "norm_num_groups": 8})
    with pytest.raises(PlanError, match="config differs"):
        plan.validate_for(changed)


def test_weights_fingerprint_follows_the_weights(unet: torch.nn.Module) -> None:
    before = weights_fingerprint(unet)
    assert weights_fingerprint(unet) == before
    param = unet.conv_out.weight
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(1e-3)
        assert weights_fingerprint(unet) != before
        param.copy_(saved)
    assert weights_fingerprint(unet) == before


def test_profile_units_measures_every_unit() -> None:
    adapter = adapt(tiny_sd3_pipeline(with_t5=False).transformer)
    shape = dict(batch=1, height=128, width=128, dtype=torch.float32, device="cpu", text_len=8)
    measured = profile_units(adapter, warmup=0, repeat=2, **shape)
    assert [u.name for u in measured.units] == [u.name for u in adapter.units]
    assert all(u.ms > 0 for u in measured.units) and all(u.flops > 0 for u in measured.units)
    assert measured.total_ms == pytest.approx(sum(measured.costs)) and measured.prepare_ms > 0
    assert measured.timer == "perf_counter" and measured.dtype == "float32" and measured.text_len == 8
    args, kwargs = adapter.example_inputs(**shape)
    assert measured.edges == adapter.trace(*args, **kwargs)
    with pytest.raises(ValueError, match="move it first"):
        profile_units(adapter, **{**shape, "dtype": torch.float16})


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_corrupt_or_foreign_files_give_clear_errors(plan: Plan, tmp_path: Path) -> None:
    good = plan.save(tmp_path / "good.json").read_text()
    cases = {
        "truncated": (good[: len(good) // 2], r"not valid JSON \(line \d+, column \d+.*truncated or corrupt"),
        "empty": ("", r"not valid JSON \(it is empty\)"),
        "binary": ("\udcff", None),
        "list": ("[1, 2]", "must be a JSON object"),
        "foreign": ('{"hello": 1}', "no 'schema_version'"),
        "newer": (json.dumps({**json.loads(good), "schema_version": 99}), "schema_version 99 is not 1"),
        "missing": (
            json.dumps({k: v for k, v in json.loads(good).items() if k != "stages"}),
            "missing field.*stages",
        ),
        "wrong type": (json.dumps({**json.loads(good), "devices": "two"}), "'devices' is 'two'"),
        "bad stage": (
            json.dumps({**json.loads(good), "stages": json.loads(good)["stages"][:1]}),
            "1 stages but devices=2",
        ),
    }
    for name, (text, reason) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        if name == "binary":
            path.write_bytes(b"\xff\xfe\x00garbage")
            reason = "not a plan file"
        else:
            _write(path, text)
        with pytest.raises(PlanError, match=reason) as info:
            load_plan(path)
        assert str(path) in str(info.value), name
    with pytest.raises(PlanError, match="no plan file at"):
        load_plan(tmp_path / "absent.json")


# -- accel plan ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def test_cli_plan_demo_writes_a_valid_plan(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    result = runner.invoke(
        app,
        [
            "plan",
            *"--demo sdxl --height 128 --width 128 --devices 2 --repeat 2 --warmup 1 -o".split(),
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    loaded = load_plan(out)
    assert loaded.devices == 2 and loaded.source == {"kind": "demo", "name": "sdxl"}
    assert loaded.resolutions == ((128, 128),) and loaded.dtype == "fp32"
    assert "balance (max/mean)" in result.output and "boundary MB" in result.output
    loaded.validate_for(tiny_sdxl_pipeline().unet, height=128, width=128, devices=2)


def test_cli_plan_json_for_sd3(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "sd3.json"
    result = runner.invoke(
        app, ["plan", *"--demo sd3 --devices 3 --json --repeat 1 --warmup 0 -o".split(), str(out)]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["family"] == "dit" and printed["layout"] == "chain" and len(printed["stages"]) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["does/not/exist/anywhere"], "no such folder"),
        (["."], "not a diffusers pipeline folder"),
        (["--demo", "sdxl9"], "not one of sdxl, sd3"),
        ([], "give exactly one of MODEL"),
        (["--demo", "sdxl", "--devices", "99"], "cannot cut 34 units into 99"),
    ],
)
def test_cli_plan_bad_input_fails_cleanly_without_a_file(
    runner: CliRunner, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["plan", *args, "-o", str(out), "--repeat", "1", "--warmup", "0"])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_plan_from_a_pipeline_folder(runner: CliRunner, tmp_path: Path) -> None:
    folder = tmp_path / "pipe"
    tiny_sdxl_pipeline().save_pretrained(folder)
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["plan", str(folder), *"--repeat 1 --warmup 0 -o".split(), str(out)])
    assert result.exit_code == 0, result.output
    loaded = load_plan(out)
    assert loaded.source == {"kind": "folder", "path": str(folder.resolve())}
    assert loaded.resolutions == ((128, 128),) and loaded.devices == 2  # the model's default size
    loaded.validate_for(tiny_sdxl_pipeline().unet)  # the demo pipeline has the same weights
