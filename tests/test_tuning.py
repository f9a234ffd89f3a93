"""Tuned engines: the tuning is validated once, recorded in the manifest, shown by `accel inspect`, used
again at load, and an export asked for other tuning rebuilds the engine; the tuning budget of an export
drops the searches of a stage past it, which its engine says, and the same request keeps."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from accel.cli import app as cli
from accel.cli.inspect import inspect_engines
from accel.compile.backends import BackendError, InductorBackend, get_backend
from accel.compile.budget import BudgetExceeded, exceeded, time_budget
from accel.compile.store import TUNING_ASKED, TUNING_NOTE, EngineError, EngineStore, record_tuning
from accel.settings import SettingsError, Tuning

KEY = "mlp.b2"
INPUTS = (torch.linspace(-1, 1, 8).reshape(2, 4),)


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).eval()


def test_tuning_is_validated_and_names_inductor_options() -> None:
    assert Tuning().inductor_options() == {} and Tuning().describe() == "default"
    assert Tuning.full().inductor_options() == {
        "conv_1x1_as_mm": True,
        "coordinate_descent_tuning": True,
        "max_autotune": True,
    }
    assert Tuning.from_dict(None) == Tuning()
    assert Tuning.from_dict(Tuning.full().to_dict()) == Tuning.full()
    with pytest.raises(SettingsError, match="fast_math are unknown"):
        Tuning.from_dict({"fast_math": True})
    with pytest.raises(SettingsError, match="autotune='yes' must be True or False"):
        Tuning(autotune="yes")  # type: ignore[arg-type]
    # What `accel export --tune` takes: names comma-separated or repeated, or "all".
    assert Tuning.parse(["fused_qkv,coordinate_descent", "conv_1x1_as_mm"]) == Tuning(
        fused_qkv=True, coordinate_descent=True, conv_1x1_as_mm=True
    )
    assert Tuning.parse(["all"]) == Tuning.full() and Tuning.parse([]) == Tuning()
    with pytest.raises(SettingsError, match="'fast' are unknown; choose from all, conv_1x1_as_mm"):
        Tuning.parse(["fused_qkv,fast"])
    result = CliRunner().invoke(
        cli.app, ["export", "missing.plan.json", "--backend", "aot", "--tune", "fast"]
    )
    assert result.exit_code == 2 and "'fast' are unknown" in " ".join(result.output.split())


def test_backends_that_take_no_tuning_refuse_it_and_inductor_refuses_a_mode_beside_it() -> None:
    with pytest.raises(BackendError, match="'onnx' takes no tuning options .* inductor and aot"):
        get_backend("onnx", Tuning.full())
    assert get_backend("onnx", Tuning()).name == "onnx"
    with pytest.raises(BackendError, match="mode 'max-autotune' and tuning"):
        InductorBackend(mode="max-autotune").tuned(Tuning(coordinate_descent=True)).compile(_module(), INPUTS)
    result = CliRunner().invoke(
        cli.app, ["export", "missing.plan.json", "--backend", "onnx", "--tune", "all"]
    )
    assert result.exit_code == 2 and "takes no tuning options" in " ".join(result.output.split())


def test_a_tuned_aot_engine_is_recorded_shown_loaded_as_built_and_rebuilt_for_other_tuning(
    tmp_path: Path,
) -> None:
    module, directory = _module(), tmp_path / "engines"
    store = EngineStore(directory)
    # On CPU, autotuning's GEMM templates would pack the weights into the package: refused with the reason.
    with pytest.raises(BackendError, match="export CPU engines without autotune in --tune"):
        store.export(KEY, get_backend("aot", Tuning(autotune=True)), module, INPUTS)
    tuning = Tuning(conv_1x1_as_mm=True, coordinate_descent=True)
    with torch.no_grad():
        began = time.perf_counter()
        tuned = store.export(KEY, get_backend("aot", tuning), module, INPUTS)
        took = time.perf_counter() - began
        assert tuned.extra["tuning"] == tuning.to_dict()
        # What the engine cost to build is recorded and shown (a part of the export call's own time).
        assert 0 < tuned.extra["build_s"] <= took + 0.05
        # A run's plain backend loads the engine with the tuning it was built with.
        fn = store.load(KEY, "aot", module, INPUTS)
        (out,) = fn(*INPUTS)  # a stage callable returns its outputs as a tuple
        torch.testing.assert_close(out, module(*INPUTS), rtol=1e-5, atol=1e-6)
        (entry,) = inspect_engines(directory)["engines"]
        assert entry["tuning"] == tuning.to_dict() and not entry["problems"]
        assert entry["build_s"] == tuned.extra["build_s"]
        table = CliRunner().invoke(cli.app, ["inspect", str(directory)], env={"COLUMNS": "250"})
        assert table.exit_code == 0 and "conv_1x1_as_mm, coordinate_descent" in table.output
        assert f"{tuned.extra['build_s']:.0f} s" in table.output and "built in" in table.output
        # The same tuning keeps the engine; other tuning rebuilds it.
        assert store.export(KEY, get_backend("aot", tuning), module, INPUTS) == tuned
        plain = store.export(KEY, "aot", module, INPUTS)
    assert plain.extra["tuning"] == Tuning().to_dict() and plain.created >= tuned.created
    assert EngineStore(directory).records()[KEY] == plain


def test_a_budget_interrupts_the_body_and_puts_the_previous_timer_back() -> None:
    began = time.monotonic()
    with pytest.raises(BudgetExceeded, match=r"sleeping ran past its budget of 0.2 s \(0.2 s\)"):
        with time_budget(0.2, "sleeping"):
            time.sleep(5)
    assert time.monotonic() - began < 2
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL

    # An enclosing timer keeps running (less the time spent inside) and fires afterwards.
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.6)
        with time_budget(5.0, "quick work"):
            time.sleep(0.1)
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 0 < remaining <= 0.5  # less the 0.1 s or more spent inside
        time.sleep(remaining + 0.3)
        assert fired == [signal.SIGALRM]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    # Compilers swallow exceptions in places (a failed cache lookup falls back to compiling): an expired
    # budget raises again until its exception leaves the body; a compiler's wrapper is seen through.
    swallowed: list[BudgetExceeded] = []
    began = time.monotonic()
    with pytest.raises(BudgetExceeded, match="stubborn"):
        with time_budget(0.2, "stubborn"):
            try:
                time.sleep(5)
            except BudgetExceeded as exc:
                swallowed.append(exc)
            time.sleep(5)
    assert len(swallowed) == 1 and time.monotonic() - began < 2
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    from torch._inductor.exc import InductorError

    wrapped = InductorError(swallowed[0], None)
    assert exceeded(wrapped) is swallowed[0] and exceeded(ValueError("other")) is None
    try:
        raise RuntimeError("compiling failed") from wrapped
    except RuntimeError as chained:
        assert exceeded(chained) is swallowed[0]

    with pytest.raises(ValueError, match="positive number of seconds"):
        with time_budget(0, "nothing"):
            pass
    errors: list[BaseException] = []

    def elsewhere() -> None:
        try:
            with time_budget(1.0, "tuning in a thread"):
                pass
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert "only the main thread receives" in str(errors[0])


def test_a_stage_past_its_tuning_budget_is_built_without_searches_and_says_so(tmp_path: Path) -> None:
    module, directory = _module(), tmp_path / "engines"
    store = EngineStore(directory)
    asked = Tuning(coordinate_descent=True, conv_1x1_as_mm=True)
    aot = get_backend("aot", asked)
    with torch.no_grad():
        # 1 ms: the deadline falls inside the real export, which is then built without the search.
        record = store.export(KEY, aot, module, INPUTS, tune_budget_s=0.001)
        assert record_tuning(record) == Tuning(conv_1x1_as_mm=True) == asked.without_search()
        assert Tuning.from_dict(record.extra[TUNING_ASKED]) == asked
        assert (
            "tuning engine 'mlp.b2' (conv_1x1_as_mm, coordinate_descent) ran past its budget of 0.001 s"
            in (record.extra[TUNING_NOTE])
        )
        (out,) = store.load(KEY, "aot", module, INPUTS)(*INPUTS)
        torch.testing.assert_close(out, module(*INPUTS), rtol=1e-5, atol=1e-6)
        shown = CliRunner().invoke(cli.app, ["inspect", str(directory)], env={"COLUMNS": "250"})
        assert shown.exit_code == 0 and "conv_1x1_as_mm (searches past the export's budget)" in shown.output
        # The speed suite's report names the engines' tuning the same way.
        from accel.bench.speed import engine_tuning

        assert engine_tuning(str(directory)) == {KEY: "conv_1x1_as_mm (searches past the export's budget)"}
        assert engine_tuning(None) is None and engine_tuning(str(tmp_path / "none")) == {}

        # The same request keeps it (its searches would run past the budget again); --rebuild retries.
        assert store.export(KEY, aot, module, INPUTS, tune_budget_s=0.001) == record
        rebuilt = store.export(KEY, aot, module, INPUTS, rebuild=True, tune_budget_s=600.0)
    assert record_tuning(rebuilt) == asked and TUNING_NOTE not in rebuilt.extra
    assert EngineStore(directory).records()[KEY] == rebuilt
    # An engine missing from a tuned directory: the fix asks for the same tuning, which keeps the others.
    EngineStore(directory).expect([KEY, "gone.b1"])
    shown = CliRunner().invoke(cli.app, ["inspect", str(directory)], env={"COLUMNS": "250"})
    text = " ".join(shown.output.split())
    assert shown.exit_code == 1 and "--backend aot --tune conv_1x1_as_mm,coordinate_descent -o" in text
    # A run refused an engine is told the same.
    fix = r"Fix: re-export \(`accel export PLAN --backend aot --tune conv_1x1_as_mm,coordinate_descent -o "
    with pytest.raises(EngineError, match=fix):
        EngineStore(directory).validate("gone.b1", "aot", module, INPUTS)


def test_the_cli_refuses_a_budget_below_a_second() -> None:
    result = CliRunner().invoke(
        cli.app,
        ["export", "missing.plan.json", "--tune", "all", "--tune-budget", "0.5"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2 and "--tune-budget" in result.output
    result = CliRunner().invoke(
        cli.app,
        ["export", "missing.plan.json", "--tune", "fused_qkv", "--tune-budget", "60"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2 and "add one of them to --tune" in " ".join(result.output.split())
