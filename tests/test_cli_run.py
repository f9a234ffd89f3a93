"""`accel run`: launches its workers, runs plans, batches prompt files, runs user scripts, reports a failed
rank clearly, and refuses bad input before starting anything (leaving nothing behind)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from accel.cli import app as cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


def test_run_plan_with_prompts_file(runner, sd3_plan, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue sphere\na green cone\n")
    out = tmp_path / "out"
    args = ["run", str(sd3_plan), "--accelerator", "cpu", "--prompts-file", str(prompts)]
    result = runner.invoke(cli.app, [*args, "--steps", "6", "--schedule", "2-4", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # The plan decided the model (its source), the device count, the strategy, the size and the batch.
    assert (summary["world_size"], summary["strategy"], summary["prompts"]) == (2, "hybrid", 3)
    assert [c["images"] for c in summary["calls"]] == [1, 1, 1]  # the plan's batch bucket is 1
    assert all(c["window"] == [2, 4] and c["steps"]["pipeline"] == 3 for c in summary["calls"])
    assert summary["images"] == [str(out / f"{i:04d}.png") for i in range(3)]
    assert Image.open(out / "0002.png").size == (64, 64)
    assert _files(out) == ["0000.png", "0001.png", "0002.png"]  # no temporary files left


def test_run_script_failure_on_one_rank_ends_all_ranks(runner) -> None:
    script = REPO / "tests" / "scripts" / "two_ranks.py"
    result = runner.invoke(
        cli.app, ["run", str(script), "--devices", "2", "--accelerator", "cpu", "--", "fail-rank1"]
    )
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "rank 1 failed: RuntimeError: injected failure on rank 1 at step 1" in message, result.output
    assert "rank(s) 0 stopped as well" in message


def _write_plan_variant(plan: Path, target: Path, **changes: object) -> Path:
    data = json.loads(plan.read_text())
    data.update(changes)
    target.write_text(json.dumps(data))
    return target


BAD_INPUT = [
    (["run"], "either a TARGET"),
    (["run", "/nonexistent/model"], "no such folder"),
    (["run", "{tmp}"], "not a diffusers pipeline folder"),
    (["run", "{tmp}/missing.json"], "no plan file at"),
    (["run", "{tmp}/missing.py"], "no such script"),
    (["run", "--demo", "sdxl", "--backend", "fast"], "--backend 'fast' is not one of"),
    (["run", "--demo", "sdxl", "--backend", "tensorrt"], "backend 'tensorrt' cannot run here"),
    (["run", "--demo", "sdxl", "--backend", "aot", "--engines", "{tmp}"], "is not an engine directory"),
    (["run", "--demo", "sdxl", "--devices", "3", "--accelerator", "cpu"], "world size 3"),
    (["run", "--demo", "sdxl", "--devices", "2", "--accelerator", "cuda"], "CUDA devices were requested"),
    (
        ["run", "--demo", "sdxl", "--devices", "3", "--accelerator", "cpu", "--strategy", "hybrid"],
        "world size 3",
    ),
    (["run", "--demo", "sdxl", "--precision", "fp8"], "precision='fp8'"),
    (["run", "--demo", "sdxl", "--strategy", "pipe"], "strategy='pipe'"),
    (["run", "--demo", "sdxl", "--window-guidance", "some"], "window_guidance='some'"),
    (["run", "--demo", "sdxl", "--schedule", "sometimes"], "--schedule 'sometimes'"),
    (["run", "--demo", "sdxl", "--num-nodes", "2"], "needs --master-port"),
    (
        ["run", "--demo", "sdxl", "--num-nodes", "2", "--node-rank", "2", "--master-port", "29555"],
        "outside 0..1",
    ),
    (["run", "--demo", "sdxl", "--prompts-file", "{tmp}/none.txt"], "no such file"),
    (["run", "--demo", "sdxl", "stray"], "not both"),
    (["run", "{tmp}", "stray"], "only a script.py target takes arguments"),
    (["run", "--demo", "sdxl", "-o", "{tmp}/x.gif"], "images are written as"),
    (["run", "{script}", "--steps", "3"], "pass them after `--`"),
    (["run", "--demo", "sdxl", "--height", "100"], "--height 100 is not a multiple of 8"),
    (["run", "--demo", "sd3", "--width", "72"], "--width 72 is not a multiple of 16"),
    (["run", "--demo", "sdxl", "--height", "100000"], "--height 100000 is more than this model serves"),
    (
        ["run", "--demo", "sdxl", "--steps", "10", "--strategy", "hybrid", "--schedule", "5-12"],
        "--schedule 5-12 ends after the last step (9) of a 10-step run",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_run_refuses_bad_input(runner, tmp_path, args, message) -> None:
    script = tmp_path / "gen.py"
    script.write_text("raise SystemExit('must not run')\n")
    before = _files(tmp_path)
    args = [a.format(tmp=tmp_path, script=script) for a in args]
    output = [] if "-o" in args else ["-o", str(tmp_path / "never.png")]
    result = runner.invoke(cli.app, [*args, *output])
    assert result.exit_code == 2, result.output  # refused up front, before any worker starts
    assert message in " ".join(result.output.split()), result.output
    assert _files(tmp_path) == before  # nothing written, not even a folder


def test_run_refuses_plans_that_cannot_run(runner, sd3_plan, tmp_path) -> None:
    cases = {
        "corrupt": (sd3_plan.read_text()[:120], "not valid JSON"),
        "moved": (
            _write_plan_variant(
                sd3_plan, tmp_path / "m.json", source={"kind": "folder", "path": "/gone"}
            ).read_text(),
            "which is not there",
        ),
    }
    for name, (text, message) in cases.items():
        plan = tmp_path / f"{name}.plan.json"
        plan.write_text(text)
        result = runner.invoke(
            cli.app, ["run", str(plan), "--accelerator", "cpu", "-o", str(tmp_path / "x.png")]
        )
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    shapes = [
        (["--height", "128", "--width", "128"], "128x128 is not one of its resolutions (64x64)"),
        (["--batch-size", "2"], "a call of 2 prompt(s) is not one of its batch sizes [1]"),
        (["--devices", "6"], "has 2 stages, this run has 6 processes"),
    ]
    for extra, message in shapes:
        result = runner.invoke(
            cli.app, ["run", str(sd3_plan), "--accelerator", "cpu", *extra, "-o", str(tmp_path / "x.png")]
        )
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "x.png").exists()


def test_run_help_names_every_launch_option(runner) -> None:
    result = runner.invoke(cli.app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--num-nodes",
        "--node-rank",
        "--master-addr",
        "--master-port",
        "--prompts-file",
        "--engines",
    ):
        assert option in result.output


def _model_folder(folder: Path) -> Path:
    from accel.testing import build_pipeline

    build_pipeline("sdxl").save_pretrained(folder)
    return folder


def test_run_refuses_broken_model_folders_and_a_plan_of_another_precision(runner, sd3_plan, tmp_path) -> None:
    model = _model_folder(tmp_path / "model")
    index = model / "model_index.json"
    good = index.read_text()
    index.write_text(good[:60])
    out = ["--accelerator", "cpu", "-o", str(tmp_path / "x.png")]
    corrupt = runner.invoke(cli.app, ["run", str(model), *out])
    assert corrupt.exit_code == 2, corrupt.output
    assert f"{index} is not valid JSON" in " ".join(corrupt.output.split())
    index.write_text(good)
    (model / "vae" / "config.json").rename(model / "vae" / "config.json.bak")
    missing = runner.invoke(cli.app, ["run", str(model), *out])
    assert missing.exit_code == 2, missing.output
    assert f"{model / 'vae'} has no config.json" in " ".join(missing.output.split())
    shutil.rmtree(model / "unet")
    gone = runner.invoke(cli.app, ["run", str(model), *out])
    assert gone.exit_code == 2 and f"component 'unet' ({model / 'unet'})" in " ".join(gone.output.split())

    fp16 = runner.invoke(cli.app, ["run", str(sd3_plan), "--precision", "fp16", *out])
    assert fp16.exit_code == 2, fp16.output
    message = " ".join(fp16.output.split())
    assert "profiled in fp32, --precision fp16" in message and "weights" not in message
    assert not (tmp_path / "x.png").exists()


def test_a_plan_checks_another_precision_without_a_false_weights_complaint(sd3_plan) -> None:
    import torch

    from accel.plan import PlanError, load_plan
    from accel.source import ModelSource
    from accel.targets import load_denoiser

    denoiser, _ = load_denoiser(ModelSource.demo("sd3"), dtype=torch.float16, device="cpu")
    with pytest.raises(PlanError, match="profiled in fp32, this run uses fp16") as info:
        load_plan(sd3_plan).validate_for(denoiser)
    assert "weights" not in str(info.value)


@pytest.fixture(scope="module")
def sd3_engines(sd3_onnx_export) -> Path:
    """ONNX engines of every stage of ``sd3_plan`` (conftest: one `accel export` for the session)."""
    directory, _ = sd3_onnx_export
    return directory


def _job(plan: Path, engines: Path, tmp_path: Path, **request: object) -> object:
    from accel.jobs import Layout, generation_job
    from accel.request import GenerationRequest
    from accel.targets import resolve_target

    asked = GenerationRequest(engines=engines, output=tmp_path / "x.png", **request)  # type: ignore[arg-type]
    return generation_job(
        resolve_target(str(plan), None), asked, Layout(accelerator="cpu"), progress=False, log_level="WARNING"
    )


def test_run_checks_the_engine_directory_before_launching(runner, sd3_plan, sd3_engines, tmp_path) -> None:
    job, _ = _job(sd3_plan, sd3_engines, tmp_path)  # a fitting directory passes
    engines = tmp_path / "engines"
    out = ["--accelerator", "cpu", "-o", str(tmp_path / "x.png")]
    manifest = engines / "manifest.json"
    cases = []
    shutil.copytree(sd3_engines, engines)
    window = sorted(p for p in engines.iterdir() if p.name.startswith("window."))[0]
    window.write_bytes(window.read_bytes()[:10])
    cases.append(("truncated", f"engine '{window.name.split('.onnx')[0]}'"))
    data = json.loads(manifest.read_text())
    cfg = data["engines"]["cfg.full.64x64.b1"]
    cfg["inputs"][0]["shape"][-1] += 1
    dropped = sorted(k for k in data["engines"] if k.startswith("window."))[-1]
    del data["engines"][dropped]
    manifest.write_text(json.dumps(data))
    cases += [("shapes differ", "engine 'cfg.full.64x64.b1'"), (f"no engine {dropped!r}", "")]
    result = runner.invoke(cli.app, ["run", str(sd3_plan), "--engines", str(engines), *out])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    for problem, key in cases:
        assert problem in message and key in message, (problem, result.output)
    assert (
        f"accel export {sd3_plan} --backend onnx -o {engines}" in message and "--compile-missing" in message
    )
    # Asked for explicitly, the workers compile what the directory cannot serve.
    job, _ = _job(sd3_plan, engines, tmp_path, compile_missing=True)
    assert job.settings["engines"] == str(engines.resolve())
    assert not (tmp_path / "x.png").exists()


def test_run_loads_an_sd3_folder_saved_without_its_t5_encoder(runner, tmp_path) -> None:
    from accel.testing import build_pipeline

    pipe = build_pipeline("sd3")
    pipe.register_modules(text_encoder_3=None, tokenizer_3=None)  # how SD3 is often served: no T5
    pipe.save_pretrained(tmp_path / "sd3")
    index = json.loads((tmp_path / "sd3" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None]
    out = tmp_path / "x.png"
    args = ["run", str(tmp_path / "sd3"), "--devices", "1", "--accelerator", "cpu", "--steps", "2"]
    result = runner.invoke(cli.app, [*args, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    side = pipe.default_sample_size * pipe.vae_scale_factor
    assert Image.open(out).size == (side, side)


def test_the_pre_launch_engine_check_reads_no_weights_for_engines_that_bind_them(
    runner, tmp_path, monkeypatch
) -> None:
    """Engines that bind the weights at load (eager, inductor, aot) are checked before launch against the
    folder's denoiser built on the meta device: the same graphs and shapes as a real load, no weight read
    (the workers load them next). A graph change is still refused there."""
    import torch

    from accel import targets
    from accel.compile.engines import export_plan, stage_jobs
    from accel.compile.store import graph_fingerprint, input_specs
    from accel.jobs import check_engines
    from accel.plan import load_plan
    from accel.request import RequestError
    from accel.testing import build_pipeline

    folder = tmp_path / "sd3"
    build_pipeline("sd3").save_pretrained(folder)
    plan = tmp_path / "sd3.plan.json"
    args = ["plan", str(folder), "--height", "64", "--width", "64", "--devices", "2", "--warmup", "0"]
    made = runner.invoke(cli.app, [*args, "--repeat", "1", "-o", str(plan)])
    assert made.exit_code == 0, made.output
    target = targets.resolve_target(str(plan), None)
    real, _ = targets.load_denoiser(target.source, dtype=torch.float32, device="cpu")
    structure = targets.denoiser_structure(target.source, dtype=torch.float32)
    assert structure is not None and all(p.device.type == "meta" for p in structure.parameters())

    def graphs(model: torch.nn.Module) -> dict[str, tuple[str, list]]:
        return {
            j.key: (graph_fingerprint(j.module, j.example_inputs), input_specs(j.module, j.example_inputs))
            for j in stage_jobs(load_plan(plan), model)
        }

    assert graphs(structure) == graphs(real) and len(graphs(real)) > 1  # the whole denoiser and windows
    engines = tmp_path / "engines"
    with torch.no_grad():
        export_plan(load_plan(plan), real, "eager", engines)

    def no_weights(*args: object, **kwargs: object) -> object:
        raise AssertionError("the pre-launch check of binding engines reads no weights")

    monkeypatch.setattr(targets, "load_denoiser", no_weights)
    check_engines(target, engines, "eager", None, "cpu", "hybrid")  # fits, from the config alone
    manifest = engines / "manifest.json"
    data = json.loads(manifest.read_text())
    data["engines"]["cfg.full.64x64.b1"]["graph_fingerprint"] = "0" * 16
    manifest.write_text(json.dumps(data))
    with pytest.raises(RequestError) as refused:
        check_engines(target, engines, "eager", None, "cpu", "hybrid")
    message = str(refused.value)
    assert "engine 'cfg.full.64x64.b1'" in message and "graph differs" in message


def test_run_summary_names_what_the_stages_cost() -> None:
    """The human summary of a run with compiled stages has one line on how they were made and what their
    first calls cost; an eager run has none."""
    from rich.console import Console

    from accel.cli.run import _print_summary

    call = {"images": 1, "seconds": 2.5, "collectives": 0, "bytes_sent": 0}
    staged = {
        **call,
        "loaded_stages": 2,
        "stage_seconds": 0.5,
        "stage_first_call_seconds": 82.04,
        "compiler_work": {"graphs_generated": 0, "graphs_cached": 2, "kernel_benchmarks": 1432},
    }
    summary = {
        "target": "p.json",
        "world_size": 1,
        "steps": 50,
        "strategy": "cfg",
        "images": [],
        "node_rank": 0,
    }
    for calls, line in (
        (
            [staged],
            "stages: 2 loaded, 0 compiled, 0 eager; 0.5 s to load or compile, 82.0 s in first calls; "
            "compiler: 0 graph(s) generated, 2 read from the cache, 1432 kernel benchmark call(s)",
        ),
        ([call], None),
    ):
        console = Console(record=True, width=300)
        _print_summary(console, {**summary, "calls": calls})
        text = console.export_text()
        assert (line in text) if line else ("stages:" not in text), text
