"""Engine directory + manifest: validation refuses every mismatch with its reason; atomic, locked writes."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from accel.compile.store import MANIFEST, EngineError, EngineStore

KEY = "tiny.b2"


def _module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).eval()


INPUTS = (torch.linspace(-1, 1, 8).reshape(2, 4),)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small ONNX engine, exported once for the whole module; tests tamper with copies."""
    directory = tmp_path_factory.mktemp("engines") / "engines"
    with torch.no_grad():
        EngineStore(directory).export(KEY, "onnx", _module(), INPUTS)
    return directory


@pytest.fixture
def engines(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "engines"
    shutil.copytree(built, copy)
    return copy


def _refusal(directory: Path, module: torch.nn.Module, inputs: Any = INPUTS) -> str:
    with pytest.raises(EngineError) as info:
        EngineStore(directory).load(KEY, "onnx", module, inputs)
    message = str(info.value)
    assert "re-export" in message and "rebuild=True" in message
    return message


def _file(directory: Path) -> Path:
    return directory / json.loads((directory / MANIFEST).read_text())["engines"][KEY]["file"]


def test_manifest_records_everything(engines: Path) -> None:
    record = json.loads((engines / MANIFEST).read_text())["engines"][KEY]
    assert record["backend"] == "onnx" and len(record["sha256"]) == 64
    assert record["inputs"] == [{"name": "input_0", "shape": [2, 4], "dtype": "float32"}]
    assert record["device_type"] == "cpu" and record["compute_capability"] is None
    assert set(record["versions"]) == {"torch", "diffusers", "onnx"}
    assert record["versions"]["torch"] == torch.__version__
    assert record["graph_fingerprint"] and record["weights_fingerprint"]
    assert not list(engines.glob("*.tmp")) and not list(engines.glob(".*.tmp"))


def test_fitting_engine_loads_and_matches(engines: Path) -> None:
    module = _module()
    with torch.no_grad():
        got = EngineStore(engines).load(KEY, "onnx", module, INPUTS)(*INPUTS)[0]
        torch.testing.assert_close(got, module(*INPUTS), rtol=0, atol=1e-5)


def test_refuses_other_weights(engines: Path) -> None:
    message = _refusal(engines, _module(seed=1))
    assert "built for other weights" in message


def test_refuses_other_shapes(engines: Path) -> None:
    message = _refusal(engines, _module(), (torch.ones(3, 4),))
    assert "shapes differ: input_0 built [2, 4] float32, now [3, 4] float32" in message


def test_refuses_other_versions(engines: Path) -> None:
    manifest = json.loads((engines / MANIFEST).read_text())
    manifest["engines"][KEY]["versions"]["torch"] = "2.11.0"
    (engines / MANIFEST).write_text(json.dumps(manifest))
    message = _refusal(engines, _module())
    assert f"built with torch 2.11.0, this is {torch.__version__}" in message


def test_refuses_other_compute_capability(engines: Path) -> None:
    manifest = json.loads((engines / MANIFEST).read_text())
    manifest["engines"][KEY]["device_type"] = "cuda"
    (engines / MANIFEST).write_text(json.dumps(manifest))
    assert "built for cuda, this run is on cpu" in _refusal(engines, _module())


def test_refuses_truncated_file(engines: Path) -> None:
    path = _file(engines)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _refusal(engines, _module())
    assert f"file {path} truncated" in message and "checksum mismatch" in message


def test_refuses_edited_file(engines: Path) -> None:
    path = _file(engines)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    message = _refusal(engines, _module())
    assert f"file {path} edited: checksum mismatch" in message


def test_refuses_missing_engine_and_corrupt_manifest(engines: Path) -> None:
    with pytest.raises(EngineError, match="no engine 'other'"):
        EngineStore(engines).load("other", "onnx", _module(), INPUTS)
    with pytest.raises(EngineError, match="built with backend 'onnx', this run uses 'eager'"):
        EngineStore(engines).load(KEY, "eager", _module(), INPUTS)
    (engines / MANIFEST).write_text('{"format": 1, "engi')
    with pytest.raises(EngineError, match="truncated or corrupt"):
        EngineStore(engines).load(KEY, "onnx", _module(), INPUTS)


def test_rebuild_recompiles_what_does_not_fit(engines: Path) -> None:
    other = _module(seed=1)
    with torch.no_grad():
        fn = EngineStore(engines).load(KEY, "onnx", other, INPUTS, rebuild=True)
        torch.testing.assert_close(fn(*INPUTS)[0], other(*INPUTS), rtol=0, atol=1e-5)
    EngineStore(engines).validate(KEY, "onnx", other, INPUTS)


def test_concurrent_export_waits_then_times_out(engines: Path) -> None:
    holder = EngineStore(engines)
    with holder.lock():
        with pytest.raises(EngineError, match=r"another export has held the lock .* for more than 0.2 s"):
            EngineStore(engines, lock_timeout=0.2).export(KEY, "eager", _module(), INPUTS)
    # Released: the eager engine (a signature file) is written and the onnx one kept.
    EngineStore(engines, lock_timeout=0.2).export("tiny.eager", "eager", _module(), INPUTS)
    assert set(EngineStore(engines).records()) == {KEY, "tiny.eager"}


# -- accel export ------------------------------------------------------------------------------------------
def test_cli_export_writes_engines_and_second_run_exports_nothing(
    sd3_plan: Path, sd3_onnx_export: tuple[Path, str], monkeypatch
) -> None:
    """The first `accel export` is conftest's (its engines also serve test_cli_run); this test checks what
    it wrote and said, then exports again."""
    from accel.cli.app import app
    from accel.plan import load_plan

    plan = load_plan(sd3_plan)
    out, first_output = sd3_onnx_export
    runner = CliRunner()
    args = ["export", str(sd3_plan), "--backend", "onnx", "-o", str(out)]
    keys = set(EngineStore(out).records())
    window = {f"window.s{k}.u{lo}-{hi}.64x64.b1" for k, s in enumerate(plan.stages) for lo, hi in s.segments}
    # The pipeline's VAE decoder too (latent size 8x8, one image per prompt, fp32 like the plan).
    assert keys == {"cfg.full.64x64.b1", *window, "vae.decoder.8x8.b1.float32"}
    assert f"wrote {len(keys)} engine(s), kept 0 that fit" in " ".join(first_output.split())
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{k}.onnx" for k in keys] + ["manifest.json"])

    def no_export(*a: Any, **k: Any) -> Any:
        raise AssertionError("second export must reuse the engines")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote 0 engine(s), kept {len(keys)} that fit" in " ".join(result.output.split())

    result = runner.invoke(app, ["export", str(sd3_plan), "--backend", "tvm", "-o", str(out)])
    assert result.exit_code != 0 and "tvm" in result.output


def test_other_weights_are_reported_not_refused_where_the_backend_binds_them(tmp_path: Path, caplog) -> None:
    """Graph identity and weights identity apart: a backend that reads the module's own weights when it
    runs serves other weights of the same graph (reported), while a graph change is still refused."""
    store = EngineStore(tmp_path / "engines")
    store.export(KEY, "eager", _module(), INPUTS)
    found = store.check(KEY, "eager", _module(seed=1), INPUTS)
    assert found.problems == [] and len(found.notes) == 1
    assert "built for other weights" in found.notes[0] and "without recompiling" in found.notes[0]
    with caplog.at_level(logging.WARNING, logger="accel.compile.store"):
        assert store.validate(KEY, "eager", _module(seed=1), INPUTS).key == KEY
    assert "built for other weights" in caplog.text
    other_graph = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    assert store.problems(KEY, "eager", other_graph, INPUTS) == [
        "the stage's graph differs (other model structure, unit range or fixed arguments)"
    ]


def test_other_weights_are_refused_for_engines_that_did_not_record_binding_them(tmp_path: Path) -> None:
    """An engine whose manifest entry does not say that it binds every weight at load (written by an
    earlier accel, whose aot packages could hold small weights inline) is used only with its own weights."""
    store = EngineStore(tmp_path / "engines")
    store.export(KEY, "eager", _module(), INPUTS)
    manifest = json.loads(store.manifest_path.read_text())
    manifest["engines"][KEY]["extra"] = {}
    store.manifest_path.write_text(json.dumps(manifest))
    assert store.problems(KEY, "eager", _module(), INPUTS) == []
    [problem] = store.problems(KEY, "eager", _module(seed=1), INPUTS)
    assert problem.startswith("built for other weights") and "exported by an earlier accel" in problem
