"""Model sources: the typed form of a plan's ``source`` object, and how the command line names them."""

from __future__ import annotations

import pytest

from accel.source import ModelSource, SourceError


def test_sources_round_trip_through_the_plan_format(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    cases = {
        ModelSource.demo("sdxl"): {"kind": "demo", "name": "sdxl"},
        ModelSource.arch("sd3-medium", seed=3): {"kind": "arch", "name": "sd3-medium", "seed": 3},
        ModelSource.model(str(tmp_path)): {"kind": "folder", "path": str(tmp_path.resolve())},
        ModelSource.model("org/model"): {"kind": "hub", "id": "org/model"},
    }
    for source, data in cases.items():
        assert source.to_dict() == data
        assert ModelSource.from_dict(data) == source
    assert ModelSource.demo("sd3").command_argument == "--demo sd3"
    assert ModelSource.model("org/model").command_argument == "org/model"
    assert ModelSource.demo("sdxl").is_builtin and not ModelSource.model("org/model").is_builtin


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ModelSource.demo("sd5"), "--demo 'sd5' is not one of sdxl, sd3"),
        (lambda: ModelSource.arch("tiny"), "--arch 'tiny' is not one of"),
        (lambda: ModelSource.model("/no/such/folder"), "no such folder"),
        (lambda: ModelSource.choose(None, None, None), "exactly one of"),
        (lambda: ModelSource.choose("org/model", "sdxl", None), "exactly one of"),
        (lambda: ModelSource.from_dict({"kind": "disk"}), "'kind' is one of"),
        (lambda: ModelSource.from_dict({"kind": "hub"}), "source.id"),
    ],
)
def test_bad_sources_are_refused(make, message) -> None:
    with pytest.raises(SourceError, match=message.replace("(", r"\(")):
        make()


def test_a_folder_without_model_index_is_refused(tmp_path) -> None:
    with pytest.raises(SourceError, match="not a diffusers pipeline folder"):
        ModelSource.model(str(tmp_path))
