"""`accel doctor` and `accel inspect` through typer's runner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from accel.cli import app as cli


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    cli._register()
    return CliRunner()


def test_doctor_reports_versions_and_devices(runner) -> None:
    result = runner.invoke(cli.app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in json.loads(result.output)}
    assert checks["torch"]["ok"] and checks["diffusers"]["ok"] and checks["gloo"]["ok"]
    assert "CUDA GPUs" in checks or "GPU 0" in checks


def test_inspect_shows_a_plan_and_refuses_a_corrupt_one(runner, tmp_path) -> None:
    plan = tmp_path / "p.json"
    made = runner.invoke(
        cli.app,
        [
            "plan",
            "--demo",
            "sd3",
            "--height",
            "64",
            "--width",
            "64",
            "--devices",
            "2",
            "--warmup",
            "0",
            "--repeat",
            "1",
            "-o",
            str(plan),
        ],
    )
    assert made.exit_code == 0, made.output
    shown = runner.invoke(cli.app, ["inspect", str(plan)])
    assert shown.exit_code == 0, shown.output
    assert "balance (max/mean)" in shown.output and "carry.hidden_states" in shown.output
    as_json = runner.invoke(cli.app, ["inspect", str(plan), "--json"])
    assert json.loads(as_json.output)["devices"] == 2
    plan.write_text(plan.read_text()[:100])
    bad = runner.invoke(cli.app, ["inspect", str(plan)])
    assert bad.exit_code == 1 and "invalid" in bad.output
