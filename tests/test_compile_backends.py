"""Compile backends: eager-equal stage callables, per-stage fallback, registry, TensorRT plumbing."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from accel.compile import backends as backends_mod
from accel.compile.backends import (
    BACKEND_NAMES,
    Backend,
    BackendError,
    BackendUnavailableError,
    compile_stage,
    get_backend,
)
from accel.compile.stage import build_stage
from accel.compile.store import EngineStore
from accel.models import InputShape, adapt
from accel.testing import build_pipeline


@pytest.fixture(autouse=True)
def _one_thread(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd3_stage() -> tuple[Any, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Units [1, 4) (three MMDiT blocks) of the tiny SD3 transformer, its inputs and eager outputs."""
    model = build_pipeline("sd3").transformer.eval()
    adapter = adapt(model)
    args, kwargs = adapter.example_inputs(
        InputShape(batch=1, height=128, width=128, dtype=torch.float32, device="cpu", text_len=16)
    )
    stage, inputs = build_stage(adapter, 1, 4, args, kwargs)
    with torch.no_grad():
        expected = stage(*inputs)
    return stage, inputs, expected


@pytest.fixture(scope="module")
def aot_store(sd3_stage, tmp_path_factory) -> EngineStore:
    """``sd3_stage`` exported once with the aot backend into an engine store (key ``sd3.u1-4``): the aot
    tests below share it (an export compiles C++ for tens of seconds on 2 CPU cores)."""
    stage, inputs, _ = sd3_stage
    store = EngineStore(tmp_path_factory.mktemp("aot") / "engines")
    record = store.export("sd3.u1-4", "aot", stage, inputs)
    assert record.file.endswith(".pt2")
    return store


def _close(got: Any, expected: tuple[torch.Tensor, ...], atol: float) -> None:
    got = tuple(got)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=atol)


# -- registry and fallback ------------------------------------------------------------------------------
def test_registry_lists_valid_names() -> None:
    assert set(BACKEND_NAMES) == {"eager", "inductor", "aot", "onnx", "tensorrt"}
    for name in BACKEND_NAMES:
        assert get_backend(name).name == name
    with pytest.raises(ValueError, match=r"unknown compile backend 'tvm'; valid backends: eager, inductor"):
        get_backend("tvm")


class _Broken(Backend):
    name = "broken"

    def compile(self, module: Any, example_inputs: Any, *, strict: bool = False) -> Any:
        raise RuntimeError("unsupported op aten::frobnicate")

    def export(self, module: Any, example_inputs: Any, path: Any) -> Path:
        raise NotImplementedError

    def load(self, path: Any, *, module: Any = None) -> Any:
        raise NotImplementedError


def test_failure_falls_back_to_eager_per_stage_unless_strict() -> None:
    module = torch.nn.Linear(3, 3)
    with pytest.warns(
        RuntimeWarning, match=r"stage window\.s1: backend 'broken' failed .*frobnicate.*eagerly"
    ):
        fn = compile_stage(_Broken(), module, (torch.ones(1, 3),), stage="window.s1")
    assert fn is module
    with pytest.raises(BackendError, match=r"stage cfg: backend 'broken' failed.*strict=True"):
        compile_stage(_Broken(), module, (torch.ones(1, 3),), stage="cfg", strict=True)


def test_eager_backend_is_the_module(sd3_stage) -> None:
    stage, inputs, expected = sd3_stage
    fn = get_backend("eager").compile(stage, inputs)
    with torch.no_grad():
        _close(fn(*inputs), expected, 0)


# -- TensorRT: the missing extra for real, the plumbing with a stand-in module ---------------------------
def test_tensorrt_missing_extra_error_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    if importlib.util.find_spec("torch_tensorrt") is not None:  # pragma: no cover - CI has no TensorRT
        monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # make the import fail anyway
    backend = get_backend("tensorrt")
    reason = backend.available()
    assert reason is not None
    assert "pip install 'accel[tensorrt]'" in reason and "CUDA build of torch" in reason
    with pytest.raises(BackendUnavailableError, match=r"accel\[tensorrt\]"):
        backend.compile(torch.nn.Linear(2, 2), (torch.ones(1, 2),))
    with pytest.raises(BackendError, match=r"stage s0: backend 'tensorrt' failed.*accel\[tensorrt\]"):
        compile_stage("tensorrt", torch.nn.Linear(2, 2), (torch.ones(1, 2),), stage="s0", strict=True)
    with pytest.warns(RuntimeWarning, match="stage s0.*tensorrt"):
        compile_stage("tensorrt", torch.nn.Linear(2, 2), (torch.ones(1, 2),), stage="s0")


def test_tensorrt_without_cuda_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.ModuleType("torch_tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = get_backend("tensorrt").available()
    assert reason is not None and "CUDA" in reason


def _fake_torch_tensorrt(calls: list[str]) -> types.ModuleType:
    """Stands in for torch_tensorrt: compile = torch.export; save/load = torch.export.save/load."""
    fake = types.ModuleType("torch_tensorrt")
    fake.__version__ = "0.0-standin"  # type: ignore[attr-defined]

    def compile(module: Any, ir: str, inputs: list[torch.Tensor], **kw: Any) -> Any:
        calls.append("compile")
        assert ir == "dynamo"
        return torch.export.export(module, tuple(inputs), strict=False)

    def save(compiled: Any, path: str, inputs: list[torch.Tensor]) -> None:
        calls.append("save")
        torch.export.save(compiled, path)

    def load(path: str) -> Any:
        calls.append("load")
        return torch.export.load(path)

    fake.compile = compile  # type: ignore[attr-defined]
    fake.save = save  # type: ignore[attr-defined]
    fake.load = load  # type: ignore[attr-defined]
    return fake


def test_tensorrt_plumbing_with_stand_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "torch_tensorrt", _fake_torch_tensorrt(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends_mod, "_version", lambda dist: "0.0-standin")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)).eval()
    inputs = (torch.randn(2, 4),)
    backend = get_backend("tensorrt")
    assert backend.available() is None
    with torch.no_grad():
        expected = (module(*inputs),)
        store = EngineStore(tmp_path / "engines")
        record = store.export("tiny", backend, module, inputs)
        assert record.file.endswith(".ep") and record.versions["tensorrt"] == "0.0-standin"
        assert calls == ["compile", "save"]
        fn = store.load("tiny", backend, module, inputs)
        assert calls == ["compile", "save", "load"]
        _close(fn(*inputs), expected, 1e-6)


# -- real backends on a tiny SD3 stage -----------------------------------------------------------------
def test_onnx_stage_matches_eager_and_reloads_without_export(sd3_stage, tmp_path, monkeypatch) -> None:
    stage, inputs, expected = sd3_stage
    store = EngineStore(tmp_path / "engines")
    store.export("sd3.u1-4", "onnx", stage, inputs)
    with torch.no_grad():
        _close(store.load("sd3.u1-4", "onnx", stage, inputs)(*inputs), expected, 1e-4)

    def no_export(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the second run must not export")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    store.export("sd3.u1-4", "onnx", stage, inputs)  # fits already: nothing to do
    fn = EngineStore(tmp_path / "engines").load("sd3.u1-4", "onnx", stage, inputs)
    with torch.no_grad():
        _close(fn(*inputs), expected, 1e-4)


@pytest.mark.slow
def test_aot_stage_matches_eager_and_second_run_compiles_nothing(sd3_stage, aot_store, monkeypatch) -> None:
    import torch._inductor

    stage, inputs, expected = sd3_stage

    def no_compile(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the second run must not compile")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compile)
    monkeypatch.setattr(torch.export, "export", no_compile)
    assert aot_store.export("sd3.u1-4", "aot", stage, inputs) == aot_store.records()["sd3.u1-4"]  # kept
    fn = EngineStore(aot_store.directory).load("sd3.u1-4", "aot", stage, inputs)
    with torch.no_grad():
        _close(fn(*inputs), expected, 1e-5)


@pytest.mark.slow
def test_aot_package_holds_no_weights_and_binds_the_modules_own(sd3_stage, aot_store) -> None:
    stage, inputs, _ = sd3_stage
    backend = get_backend("aot")
    path = aot_store.directory / aot_store.records()["sd3.u1-4"].file
    fn = backend.load(path, module=stage)
    try:
        with torch.no_grad():
            for p in stage.parameters():  # new values in the same memory: the package must see them
                p.mul_(0.5)
            expected = stage(*inputs)
            _close(fn(*inputs), expected, 1e-5)
    finally:
        with torch.no_grad():
            for p in stage.parameters():  # back to the shared stage's values (exact: powers of two)
                p.mul_(2.0)
    with pytest.raises(BackendError, match="holds no weights"):
        backend.load(path)


def test_aot_loader_crash_in_child_becomes_a_clear_error(tmp_path, monkeypatch) -> None:
    """A torch whose AOTInductor loader segfaults must not kill the rank: the child-process check turns it
    into a BackendError naming the cause and the fix, once per backend instance."""
    from accel.compile.backends import AOTBackend

    class Crashing(AOTBackend):
        LOADER_CHECK = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"

    backend = Crashing()
    package = tmp_path / "stage.pt2"
    package.write_bytes(b"not read")
    with pytest.raises(BackendError, match=r"crashed \(signal 11\).*--backend inductor"):
        backend.check_loader(package, 0)

    def no_second_child(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the outcome is kept: no second child process")

    monkeypatch.setattr(backends_mod.subprocess, "run", no_second_child)
    with pytest.raises(BackendError, match="cannot load AOTInductor packages"):
        backend.check_loader(package, 0)
    # Compiling in memory would end in the same loader: refused before any compilation.
    monkeypatch.setattr(torch.export, "export", no_second_child)
    with pytest.raises(BackendError, match="cannot load AOTInductor packages"):
        backend.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),))


@pytest.mark.slow
def test_aot_loader_check_passes_for_a_loadable_package(sd3_stage, aot_store) -> None:
    from accel.compile.backends import AOTBackend

    stage, inputs, expected = sd3_stage
    backend = AOTBackend()
    path = aot_store.directory / aot_store.records()["sd3.u1-4"].file
    backend.check_loader(path, -1)  # loads in a child process without error
    with torch.no_grad():
        _close(backend.load(path, module=stage)(*inputs), expected, 1e-5)


@pytest.mark.slow
def test_inductor_engine_holds_only_its_own_stage(tmp_path) -> None:
    """torch records cache artifacts per process; each exported file must carry its own stage only (the
    second of two same-sized stages was twice the first's size when files accumulated)."""
    from torch.compiler._cache import CacheArtifactManager

    backend = get_backend("inductor")
    x = torch.randn(2, 8)
    first = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU()).eval()
    second = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh()).eval()
    sizes = []
    for name, module in (("first", first), ("second", second)):
        blob = backend.export(module, (x,), tmp_path / name).read_bytes()
        assert (CacheArtifactManager.deserialize(blob) or {}).get("inductor")
        sizes.append(len(blob))
    assert sizes[1] < 1.3 * sizes[0], sizes
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_stage_matches_eager(sd3_stage, tmp_path) -> None:
    stage, inputs, expected = sd3_stage
    backend = get_backend("inductor")
    torch._dynamo.reset()
    store = EngineStore(tmp_path / "engines")
    store.export("sd3.u1-4", backend, stage, inputs)
    fn = store.load("sd3.u1-4", backend, stage, inputs)
    with torch.no_grad():
        _close(fn(*inputs), expected, 1e-5)
    torch._dynamo.reset()


def test_inductor_regional_compiles_repeated_blocks_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    from accel.compile.backends import InductorBackend

    model = build_pipeline("sdxl").unet.eval()
    adapter = adapt(model)
    args, kwargs = adapter.example_inputs(
        InputShape(batch=1, height=128, width=128, dtype=torch.float32, device="cpu")
    )
    stage, inputs = build_stage(adapter, 0, len(adapter.units), args, kwargs, whole=True)
    compiled: list[str] = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: compiled.append(type(self).__name__), raising=True
    )
    fn = InductorBackend(regional=True).compile(stage, inputs)
    assert fn is stage  # blocks are compiled in place; the stage runs as before
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert compiled == ["BasicTransformerBlock"] * len(blocks) and blocks


def test_a_passed_aot_loader_check_is_remembered(tmp_path, monkeypatch) -> None:
    """The child-process check costs an interpreter start and a torch import: once it has passed for this
    interpreter and torch build, later backend instances (later processes) skip it; a failed one is not
    remembered."""
    from accel.compile.backends import AOTBackend, loader_check_marker

    monkeypatch.setenv("ACCEL_CACHE_DIR", str(tmp_path / "cache"))

    class Passing(AOTBackend):
        LOADER_CHECK = "pass"

    class Failing(AOTBackend):
        LOADER_CHECK = "raise SystemExit('no loader here')"

    package = tmp_path / "stage.pt2"
    package.write_bytes(b"not read")
    Passing().check_loader(package, 0)
    assert loader_check_marker(Passing.LOADER_CHECK).exists()
    with pytest.raises(BackendError, match="no loader here"):
        Failing().check_loader(package, 0)
    assert not loader_check_marker(Failing.LOADER_CHECK).exists()

    def no_child(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a remembered check starts no child process")

    monkeypatch.setattr(backends_mod.subprocess, "run", no_child)
    Passing().check_loader(package, 0)
    with pytest.raises(AssertionError, match="no child process"):
        Failing().check_loader(package, 0)
