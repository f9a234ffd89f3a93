"""Stage runners notice weights replaced after binding: bound again, or refused with the reason."""

from __future__ import annotations

import logging

import pytest
import torch

from accel.compile.runner import BoundWeights, StageRunner, StaleWeightsError


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).eval()


def test_bound_weights_find_every_kind_of_replacement() -> None:
    model = _mlp()
    watch = BoundWeights(model)
    assert watch.changed() == []
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # in place: same tensor, same memory
    assert watch.changed() == []
    model[0].weight.data = torch.randn(8, 4)  # same object, new storage
    assert watch.changed() == ["0.weight"]
    watch = BoundWeights(model)
    model.load_state_dict({k: v.clone() for k, v in _mlp().state_dict().items()}, assign=True)
    assert watch.changed() == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert watch.graph_changes(model) == []  # same shapes and dtypes: can be bound again
    model[2].bias = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    assert watch.graph_changes(model) == ["2.bias was [4] torch.float32 on cpu, now [4] torch.float64 on cpu"]
    watch = BoundWeights(model)
    model[0] = torch.nn.Linear(4, 8)
    assert watch.changed() == ["0 (submodule)"]  # the old module's own tables are untouched
    assert watch.graph_changes(model) == ["submodule 0 was replaced by another module"]
    edits = BoundWeights(model, edits=True)
    with torch.no_grad():
        model[2].weight.add_(1.0)
    assert edits.changed() == ["2.weight"]


def test_engines_holding_their_weights_refuse_any_change(tmp_path) -> None:
    """An onnx stage holds its own copy of the weights: an in-place edit or a replacement after it was
    made is refused before the next call instead of being served stale."""
    pytest.importorskip("onnxruntime")
    model, x = _mlp(), torch.randn(2, 4)
    runner = StageRunner("onnx", strict=True)
    with torch.no_grad():
        fn = runner.get("mlp", model, (x,))
        torch.testing.assert_close(fn(x)[0], model(x), rtol=0, atol=1e-5)
        runner.check_weights()  # nothing changed
        model[0].weight.mul_(0.5)
    with pytest.raises(
        StaleWeightsError, match=r"stage mlp: weights changed .*\(0.weight\).*holds its own copy"
    ):
        runner.check_weights()
    assert runner.counts.rebound == 0


def test_first_calls_count_the_compilers_work(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stage compiled in memory generates its graph in its first call; the same stage loaded from an
    inductor engine into an empty compiler cache reads it back and generates nothing; loaded under a
    compiler setting the engine was not built with, it generates the graph again, and a warning says so."""
    import torch._inductor.config as inductor_config

    from accel.compile.store import EngineStore

    model, x = _mlp(), torch.randn(2, 4)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache-compile"))
    torch._dynamo.reset()
    runner = StageRunner("inductor", strict=True)
    with torch.no_grad():
        fn = runner.get("mlp", model, (x,))
        assert (runner.counts.compiled, runner.counts.first_call_seconds) == (1, 0.0)  # compiled lazily
        torch.testing.assert_close(fn(x), model(x), rtol=0, atol=1e-6)
        fn(x)
    first = runner.counts.first_call_seconds
    assert first > 0.0
    assert (runner.counts.work.graphs_generated, runner.counts.work.graphs_cached) == (1, 0)
    assert runner.counts.first_call_seconds == first  # the second call is not a first call

    engines = tmp_path / "engines"
    with torch.no_grad():
        EngineStore(engines).export("mlp", "inductor", model, (x,))
    for setting, generated, cached in (({}, 0, 1), ({"max_fusion_size": 7}, 1, 0)):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / f"cache-load-{generated}"))
        torch._dynamo.reset()
        runner = StageRunner("inductor", engines=str(engines), strict=True)
        caplog.clear()
        with torch.no_grad(), inductor_config.patch(setting), caplog.at_level(logging.INFO, "accel"):
            fn = runner.get("mlp", model, (x,))
            torch.testing.assert_close(fn(x), model(x), rtol=0, atol=1e-6)
        assert runner.counts.loaded == 1
        work = runner.counts.work
        assert (work.graphs_generated, work.graphs_cached, work.kernel_benchmarks) == (generated, cached, 0)
        assert "stage mlp: first call" in caplog.text
        assert ("yet its first call took" in caplog.text) == bool(generated), caplog.text
    torch._dynamo.reset()
