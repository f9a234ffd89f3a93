"""Stage runners notice weights replaced after binding: bound again, or refused with the reason."""

from __future__ import annotations

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
