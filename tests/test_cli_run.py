"""`accel run`: generates with spawned workers, refuses bad input clearly, leaves nothing half-written."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from accel.cli import app as cli


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    cli._register()
    return CliRunner()


def test_run_demo_on_two_cpu_processes(runner, tmp_path) -> None:
    out = tmp_path / "img.png"
    result = runner.invoke(
        cli.app,
        [
            "run",
            "--demo",
            "sdxl",
            "--devices",
            "2",
            "--accelerator",
            "cpu",
            "--steps",
            "3",
            "--warmup",
            "0",
            "-p",
            "a cat",
            "-p",
            "a dog",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["report"]["world_size"] == 2
    assert report["report"]["collectives"] == 3  # one all-gather per step
    assert sorted(report["images"]) == [str(tmp_path / "img-0.png"), str(tmp_path / "img-1.png")]
    assert Image.open(tmp_path / "img-0.png").size == (128, 128)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "either a MODEL folder or --demo"),
        (["run", "/nonexistent/model"], "not a diffusers pipeline folder"),
        (["run", "--demo", "sdxl", "--devices", "3", "--accelerator", "cpu"], "world size 3"),
        (["run", "--demo", "sdxl", "--devices", "2", "--accelerator", "cuda"], "CUDA devices were requested"),
        (["run", "--demo", "sdxl", "--precision", "fp8"], "precision='fp8'"),
    ],
)
def test_run_refuses_bad_input(runner, tmp_path, args, message) -> None:
    out = tmp_path / "never.png"
    result = runner.invoke(cli.app, [*args, "-o", str(out)])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists()
