"""`accel doctor`, `accel inspect` (plans and engine directories) and the help texts, through typer's runner."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from accel.cli import app as cli
from accel.compile.store import EngineStore, record_digest


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def test_doctor_reports_versions_devices_backends_and_a_verdict(runner) -> None:
    result = runner.invoke(cli.app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["torch"]["ok"] and checks["diffusers"]["ok"] and checks["gloo"]["ok"]
    assert "CUDA GPUs" in checks or "GPU 0" in checks
    assert report["backends"]["eager"]["usable"]
    assert set(report["backends"]) == {"eager", "inductor", "aot", "onnx", "tensorrt"}
    if not torch.cuda.is_available():
        # Every unusable backend says why and what to install.
        assert "torch-tensorrt" in report["backends"]["tensorrt"]["reason"]
        assert report["verdict"].startswith("CPU only")
        # What this machine can do: no inductor on a CPU (its engines compile again at first use).
        advice = next(fix for fix in report["fixes"] if "compile backends usable here" in fix)
        assert (
            "--backend eager" in advice
            and "inductor (" not in advice
            and "try --backend inductor" not in advice
        )
    assert report["ready"] and any("compile backends usable here" in fix for fix in report["fixes"])
    shown = runner.invoke(cli.app, ["doctor"], env={"COLUMNS": "120"})
    assert shown.exit_code == 0 and "verdict" in shown.output and "accel[tensorrt]" in shown.output


def test_inspect_shows_a_plan_and_refuses_a_corrupt_one(runner, tmp_path) -> None:
    plan = tmp_path / "p.json"
    args = ["plan", "--demo", "sd3", "--height", "64", "--width", "64", "--devices", "2"]
    made = runner.invoke(cli.app, [*args, "--warmup", "0", "--repeat", "1", "-o", str(plan)])
    assert made.exit_code == 0, made.output
    shown = runner.invoke(cli.app, ["inspect", str(plan)], env={"COLUMNS": "120"})
    assert shown.exit_code == 0, shown.output
    assert "balance (max/mean)" in shown.output and "carry.hidden_states" in shown.output
    as_json = runner.invoke(cli.app, ["inspect", str(plan), "--json"])
    assert json.loads(as_json.stdout)["devices"] == 2
    plan.write_text(plan.read_text()[:100])
    bad = runner.invoke(cli.app, ["inspect", str(plan)])
    assert bad.exit_code == 1 and "invalid" in bad.output and "accel plan" in bad.output


def _engines(directory) -> EngineStore:
    store = EngineStore(directory)
    module = torch.nn.Linear(4, 4)
    store.export("cfg.full.8x8.b1", "eager", module, [torch.randn(1, 4)])
    store.export("window.s0.u0-2.8x8.b1", "eager", module, [torch.randn(2, 4)])
    return store


def test_inspect_engine_directory_checks_every_file(runner, tmp_path) -> None:
    engines = tmp_path / "engines"
    _engines(engines)
    good = runner.invoke(cli.app, ["inspect", str(engines), "--json"])
    assert good.exit_code == 0, good.output
    info = json.loads(good.stdout)
    assert info["valid"] and [e["key"] for e in info["engines"]] == [
        "cfg.full.8x8.b1",
        "window.s0.u0-2.8x8.b1",
    ]
    assert all(not e["problems"] and not e["notes"] for e in info["engines"])
    shown = runner.invoke(cli.app, ["inspect", str(engines)], env={"COLUMNS": "160"})
    assert shown.exit_code == 0 and "every checksum matches" in shown.output

    edited = engines / "cfg.full.8x8.b1.eager.json"
    edited.write_text(edited.read_text().replace("{", "[", 1))
    truncated = engines / "window.s0.u0-2.8x8.b1.eager.json"
    truncated.write_bytes(truncated.read_bytes()[:5])
    bad = runner.invoke(cli.app, ["inspect", str(engines), "--json"])
    assert bad.exit_code == 1
    problems = {e["key"]: e["problems"] for e in json.loads(bad.stdout)["engines"]}
    assert problems["cfg.full.8x8.b1"] == ["edited after export (sha256 mismatch)"]
    assert problems["window.s0.u0-2.8x8.b1"][0].startswith("truncated (5 of")
    shown = runner.invoke(cli.app, ["inspect", str(engines)], env={"COLUMNS": "160"})
    # The advice re-exports the broken engines only (accel export rewrites what does not fit).
    assert shown.exit_code == 1 and "accel export PLAN --backend eager -o" in " ".join(shown.output.split())

    manifest = engines / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    corrupt = runner.invoke(cli.app, ["inspect", str(engines)])
    assert corrupt.exit_code == 1 and "not valid JSON" in corrupt.output
    empty = runner.invoke(cli.app, ["inspect", str(tmp_path)])
    assert empty.exit_code == 1 and "not an engine directory" in " ".join(empty.output.split())


def test_inspect_notes_engines_built_elsewhere(runner, tmp_path) -> None:
    store = _engines(tmp_path / "engines")
    manifest = json.loads(store.manifest_path.read_text())
    entry = manifest["engines"]["cfg.full.8x8.b1"]
    entry.update(device_type="cuda", compute_capability="sm_90")
    entry["versions"]["torch"] = "2.11.0+cu130"
    entry["extra"]["digest"] = record_digest(entry)  # as an export on that machine would have written it
    store.manifest_path.write_text(json.dumps(manifest))
    result = runner.invoke(cli.app, ["inspect", str(store.directory), "--json"])
    assert result.exit_code == 0  # the files are intact; they just do not fit this machine
    notes = {e["key"]: e["notes"] for e in json.loads(result.stdout)["engines"]}
    assert notes["cfg.full.8x8.b1"][0].startswith("built for cuda")
    assert any("built with torch 2.11.0+cu130" in n for n in notes["cfg.full.8x8.b1"])
    assert notes["window.s0.u0-2.8x8.b1"] == []


def test_every_command_has_help(runner) -> None:
    top = runner.invoke(cli.app, ["--help"], env={"COLUMNS": "160"})
    assert top.exit_code == 0
    commands = [c for c in ("plan", "export", "run", "bench", "inspect", "doctor") if c in top.output]
    assert {"plan", "export", "run", "inspect", "doctor"} <= set(commands)
    for command in commands:
        result = runner.invoke(cli.app, [command, "--help"], env={"COLUMNS": "160"})
        assert result.exit_code == 0 and "Usage" in result.output, command


def test_inspect_compares_engine_weights_with_a_model(runner, tmp_path) -> None:
    """Each engine says how it holds weights and which it was built with; against a model, whether that
    model's weights are the engine's own, and whether the difference is served or refused."""
    from accel.compile.store import record_digest
    from accel.source import ModelSource
    from accel.targets import load_denoiser

    model, _ = load_denoiser(ModelSource.demo("sd3"), dtype=torch.float32, device="cpu")
    store = EngineStore(tmp_path / "engines")
    store.export("cfg.full.8x8.b1", "eager", model, [torch.randn(1, 4)])

    def report() -> dict:
        result = runner.invoke(cli.app, ["inspect", str(store.directory), "--demo", "sd3", "--json"])
        assert result.exit_code == 0, result.output
        [entry] = json.loads(result.stdout)["engines"]
        return entry

    entry = report()
    assert (entry["weights"], entry["same_weights"], entry["notes"]) == ("bound at load", True, [])
    manifest = json.loads(store.manifest_path.read_text())
    built = manifest["engines"]["cfg.full.8x8.b1"]
    built["weights_fingerprint"] = "0123456789abcdef"  # exported from a fine-tune of the same graph
    built["extra"]["digest"] = record_digest(built)  # as an export writes it (an edit would be refused)
    store.manifest_path.write_text(json.dumps(manifest))
    entry = report()
    assert (entry["same_weights"], entry["weights_fingerprint"], entry["notes"]) == (
        False,
        "0123456789abcdef",
        [],
    )
    shown = runner.invoke(cli.app, ["inspect", str(store.directory), "--demo", "sd3"], env={"COLUMNS": "200"})
    assert "served without recompiling" in " ".join(shown.output.split())
    built["backend"] = "onnx"  # engines that hold their own weights are refused for other ones
    built["extra"]["digest"] = record_digest(built)
    store.manifest_path.write_text(json.dumps(manifest))
    entry = report()
    assert entry["weights"] == "baked in"
    assert "built for other weights; a onnx engine holds its own copy of them" in entry["notes"]


def test_plan_and_export_refuse_an_unwritable_output_and_bad_input(runner, sd3_plan, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ["plan", "--demo", "sd3", "--height", "64", "--width", "64", "--warmup", "0", "--repeat", "1"]
    planned = runner.invoke(cli.app, [*args, "-o", str(blocker / "plan.json")])
    assert planned.exit_code == 2, planned.output
    assert f"--output {blocker / 'plan.json'}: cannot write under {blocker}" in " ".join(
        planned.output.split()
    )
    assert planned.exception is None or isinstance(planned.exception, SystemExit)

    plan = tmp_path / "p.json"
    shutil.copy(sd3_plan, plan)  # conftest's plan of the same arguments (2 devices, 64x64), made once
    exported = runner.invoke(cli.app, ["export", str(plan), "--backend", "onnx", "-o", str(blocker / "e")])
    assert exported.exit_code == 2, exported.output
    assert f"cannot write under {blocker}" in " ".join(exported.output.split())
    # Bad input exits 2, as with accel run; the TensorRT hint keeps its [tensorrt] through rich markup.
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(plan.read_text()[:50])
    bad = runner.invoke(cli.app, ["export", str(corrupt), "--backend", "onnx", "-o", str(tmp_path / "e")])
    assert bad.exit_code == 2 and "not valid JSON" in bad.output, bad.output
    if not torch.cuda.is_available():
        trt = runner.invoke(
            cli.app, ["export", str(plan), "--backend", "tensorrt", "-o", str(tmp_path / "e")]
        )
        assert trt.exit_code == 2 and "accel[tensorrt]" in trt.output, trt.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "corrupt.json", "p.json"]


def test_inspect_finds_edited_manifests_and_interrupted_exports(runner, tmp_path) -> None:
    engines = tmp_path / "engines"
    store = EngineStore(engines)
    module = torch.nn.Linear(4, 4)
    # An export that planned three engines and was interrupted after two.
    store.expect(["cfg.full.8x8.b1", "window.s0.u0-2.8x8.b1", "window.s1.u2-4.8x8.b1"])
    store.export("cfg.full.8x8.b1", "onnx", module, [torch.randn(1, 4)])
    store.export("window.s0.u0-2.8x8.b1", "onnx", module, [torch.randn(2, 4)])
    assert sorted(p.name for p in engines.iterdir()) == [
        "cfg.full.8x8.b1.onnx",  # one suffix, not .onnx.onnx
        "manifest.json",  # and no empty .lock left behind
        "window.s0.u0-2.8x8.b1.onnx",
    ]
    incomplete = runner.invoke(cli.app, ["inspect", str(engines), "--json"])
    assert incomplete.exit_code == 1
    info = json.loads(incomplete.stdout)
    assert not info["valid"] and info["missing"] == ["window.s1.u2-4.8x8.b1"]
    shown = runner.invoke(cli.app, ["inspect", str(engines)], env={"COLUMNS": "200"})
    text = " ".join(shown.output.split())
    assert "incomplete: 1 of 3 engine(s) missing: window.s1.u2-4.8x8.b1" in text, shown.output
    assert "valid: " not in text.replace("invalid: ", "")

    manifest = json.loads(store.manifest_path.read_text())
    manifest["engines"]["cfg.full.8x8.b1"]["inputs"][0]["shape"] = [1, 5]
    store.manifest_path.write_text(json.dumps(manifest))
    edited = runner.invoke(cli.app, ["inspect", str(engines), "--json"])
    problems = {e["key"]: e["problems"] for e in json.loads(edited.stdout)["engines"]}
    assert problems["cfg.full.8x8.b1"] == ["manifest entry edited after export (its digest does not match)"]
    assert problems["window.s0.u0-2.8x8.b1"] == []
    shown = runner.invoke(cli.app, ["inspect", str(engines)], env={"COLUMNS": "200"})
    text = " ".join(shown.output.split())
    assert shown.exit_code == 1 and "accel export PLAN --backend onnx -o" in text, shown.output
    assert "--rebuild" not in text  # re-exporting rewrites only what is broken or missing


def test_plan_says_how_many_processes_it_runs_on(runner, tmp_path) -> None:
    args = ["plan", "--demo", "sd3", "--height", "64", "--width", "64", "--devices", "3", "--warmup", "0"]
    made = runner.invoke(
        cli.app, [*args, "--repeat", "1", "-o", str(tmp_path / "p.json")], env={"COLUMNS": "200"}
    )
    assert made.exit_code == 0, made.output
    message = " ".join(made.output.split())
    assert f"accel run {tmp_path / 'p.json'} runs it on 6 process(es) (--devices 6)" in message, made.output


def test_a_plan_of_several_batch_sizes_has_engine_stages_for_each(runner, tmp_path) -> None:
    from accel.compile.engines import stage_jobs
    from accel.plan import load_plan
    from accel.testing import build_pipeline

    args = ["plan", "--demo", "sdxl", "--height", "64", "--width", "64", "--devices", "1", "--warmup", "0"]
    made = runner.invoke(
        cli.app, [*args, "--batch", "1", "--batch", "3", "--batch", "1", "-o", str(tmp_path / "p.json")]
    )
    assert made.exit_code == 0, made.output
    plan = load_plan(tmp_path / "p.json")
    assert plan.batches == (1, 3)  # the first is the profiled one; repeats are dropped
    # One device runs both guidance branches in one call: engines for 2 and 6 rows.
    keys = [job.key for job in stage_jobs(plan, build_pipeline("sdxl").unet)]
    assert keys == ["cfg.full.64x64.b2", "cfg.full.64x64.b6"], keys


def test_third_party_messages_a_user_cannot_act_on_are_silenced() -> None:
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch{quiet}\n"
        "from accel.testing import build_pipeline\n"
        "build_pipeline('sdxl').unet.to(torch.float16)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for key in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "PYTHONWARNINGS"):
        env.pop(key, None)

    def stderr(quiet: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code.format(quiet=quiet)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stderr

    if importlib.util.find_spec("torchvision") is None:
        assert "requires torchvision" in stderr("")  # what the command line silences
    quiet = stderr("; from accel.quiet import quiet_third_party; quiet_third_party()")
    assert "requires torchvision" not in quiet and "kept in float32" not in quiet, quiet
    assert "FutureWarning" not in quiet, quiet
