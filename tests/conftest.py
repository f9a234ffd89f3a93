"""Test-wide settings: accel's cache folder lives in a temporary folder, never in the user's home. And the
tiny SD3's 2-device plan with its ONNX engines, made once for the modules that run, export or interrupt it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner


@pytest.fixture(autouse=True, scope="session")
def _accel_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    patch = pytest.MonkeyPatch()
    patch.setenv("ACCEL_CACHE_DIR", str(tmp_path_factory.mktemp("accel-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def sd3_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-stage plan of the tiny SD3 transformer at 64x64 (profiled once, briefly). Tests only read it:
    variants are written elsewhere."""
    from accel.cli.app import app

    plan = tmp_path_factory.mktemp("plan") / "sd3-64.plan.json"
    args = ["plan", "--demo", "sd3", "--height", "64", "--width", "64", "--devices", "2"]
    made = CliRunner().invoke(app, [*args, "--warmup", "0", "--repeat", "1", "-o", str(plan)])
    assert made.exit_code == 0, made.output
    return plan


@pytest.fixture(scope="session")
def sd3_onnx_export(sd3_plan: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`accel export` of ``sd3_plan`` with the onnx backend (every stage, and the VAE decoder): the engine
    directory and the command's output. Exported once for the session (tracing every stage for ONNX takes
    seconds); tests that tamper with engines do so on copies."""
    from accel.cli.app import app

    directory = tmp_path_factory.mktemp("onnx-engines") / "engines"
    done = CliRunner().invoke(app, ["export", str(sd3_plan), "--backend", "onnx", "-o", str(directory)])
    assert done.exit_code == 0, done.output
    return directory, done.output
