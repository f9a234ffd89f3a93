"""The launcher behind `accel run`: launch specs, the layout a launched Accelerator adopts, the example
scripts under `accel run`, and a two-node run on one machine (two `accel run` processes, one gloo worker each)."""

from __future__ import annotations

import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import accel
from accel.cli import app as cli
from accel.launch import LaunchSpec, free_port, launched_environment

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"devices": 0}, "devices must be a positive integer"),
        ({"num_nodes": 2, "node_rank": 2, "master_port": 29500}, "outside 0..1"),
        ({"num_nodes": 2}, "needs master_port"),
        ({"master_port": 70000}, "not a TCP port"),
        ({"join_timeout_s": 0}, "join_timeout_s must be > 0"),
    ],
)
def test_launch_spec_refuses_bad_layouts(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LaunchSpec(**kwargs)


def _launched(monkeypatch, world: int, local: int, rank: int = 0) -> None:
    env = {"TORCHELASTIC_RUN_ID": "t", "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": local, "RANK": rank}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))


def test_a_launched_accelerator_takes_the_launchers_layout(monkeypatch) -> None:
    assert launched_environment() is None or "TORCHELASTIC_RUN_ID" in os.environ
    _launched(monkeypatch, world=2, local=1, rank=1)
    assert launched_environment() == {
        "rank": 1,
        "local_rank": 0,
        "world_size": 2,
        "local_world_size": 1,
        "node_rank": 0,
    }
    # The script says devices=2 on one node; the launcher started 1 process on each of 2 nodes.
    settings = accel.Accelerator(devices=2, accelerator="cpu").settings
    assert (settings.devices, settings.num_nodes) == (1, 2)
    _launched(monkeypatch, world=3, local=3)
    with pytest.raises(accel.SettingsError, match="world size 3"):
        accel.Accelerator(devices=2, accelerator="cpu")
    _launched(monkeypatch, world=3, local=2)
    with pytest.raises(accel.SettingsError, match="same number of processes on every node"):
        accel.Accelerator(devices=2, accelerator="cpu")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_compile(path) -> None:
    py_compile.compile(str(path), doraise=True)


def test_tiny_example_runs_under_accel_run(tmp_path) -> None:
    out = tmp_path / "tiny.png"
    script = REPO / "examples" / "tiny_demo.py"
    args = ["run", str(script), "--devices", "2", "--accelerator", "cpu", "--json"]
    result = CliRunner().invoke(cli.app, [*args, "--", "--steps", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"ok": True, "script": str(script), "world_size": 2}
    assert Image.open(out).size == (128, 128)


def test_two_nodes_on_one_machine(tmp_path) -> None:
    port = free_port()
    out = tmp_path / "two-nodes.png"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "accel", "run", "--demo", "sd3", "--accelerator", "cpu", "--steps", "2"]
            + ["--devices", "1", "--num-nodes", "2", "--node-rank", str(rank)]
            + ["--master-addr", "127.0.0.1", "--master-port", str(port), "--timeout", "120"]
            + ["-o", str(out), "--json"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (1, 0)  # the second node may start first: it waits for node 0
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-3000:]
    node1, node0 = (json.loads(stdout) for stdout, _ in outputs)
    assert (node0["world_size"], node0["node_rank"], node1["node_rank"]) == (2, 0, 1)
    assert node0["calls"][0]["collectives"] == 2  # the two CFG branches on two "nodes", one gather per step
    assert node0["images"] == [str(out)] and node1["images"] == []
    assert Image.open(out).size == (128, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two-nodes.png"]


def _pid_or_fail(fail: bool) -> int:
    if fail:
        raise ValueError("no image for this prompt")
    return os.getpid()


def test_one_process_runs_in_this_process() -> None:
    """One device on one node needs no second interpreter: the function runs here, and its failure is the
    same LaunchError a worker's would be."""
    from accel.launch import LaunchError, launch_function

    assert launch_function(LaunchSpec(devices=1), _pid_or_fail, False) == {0: os.getpid()}
    with pytest.raises(LaunchError, match="rank 0 failed: ValueError: no image for this prompt") as info:
        launch_function(LaunchSpec(devices=1), _pid_or_fail, True)
    assert info.value.failures == {0: "ValueError: no image for this prompt"}


def test_the_first_failing_ranks_error_is_the_last_line() -> None:
    # Rank 0 fails and is slow to exit; rank 1, stopped by the failure monitor, exits first. The last
    # line must still be rank 0's EngineError, not "rank 1 failed: exited with code 1".
    script = REPO / "tests" / "scripts" / "late_failure.py"
    result = CliRunner().invoke(cli.app, ["run", str(script), "--devices", "2", "--accelerator", "cpu"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and last.endswith("(rank(s) 1 stopped as well)"), result.output
    assert "rank 0 failed: EngineError: engine 'cfg.full.64x64.b1' cannot be used: file truncated" in last


def _interrupt_after(args: list[str], marker: str, signum: int, delay_s: float) -> tuple[int, str, float]:
    """Start ``python -m accel ARGS``, send ``signum`` ``delay_s`` after ``marker`` shows on its stderr;
    its exit status, its stderr and the seconds from the signal to its exit."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "accel", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            break
    time.sleep(delay_s)
    sent = time.monotonic()
    proc.send_signal(signum)
    rest = proc.stderr.read()
    code = proc.wait(timeout=120)
    assert signal.Signals(signum)  # a real signal, sent to the real process
    return code, "".join(seen) + rest, time.monotonic() - sent


@pytest.mark.parametrize(("signame", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_stops_accel_run_promptly_with_one_line(tmp_path, signame, code) -> None:
    import signal

    args = ["run", "--demo", "sdxl", "--devices", "2", "--accelerator", "cpu", "-o", str(tmp_path / "x.png")]
    # During the workers' start-up: they are importing torch and joining the group.
    got, stderr, seconds = _interrupt_after(args, "accel run:", getattr(signal, signame), 1.0)
    assert got == code, stderr
    assert "Traceback" not in stderr, stderr
    assert "requires torchvision" not in stderr, stderr  # third-party notes a user cannot act on (no -v)
    assert stderr.strip().splitlines()[-1] == f"accel: interrupted ({signame}), stopped.", stderr
    assert seconds < 8, seconds
    assert not (tmp_path / "x.png").exists()


def test_a_signal_stops_accel_export_with_a_message(sd3_plan, tmp_path) -> None:
    import signal

    export = ["export", str(sd3_plan), "--backend", "onnx", "-o", str(tmp_path / "engines")]
    got, stderr, _ = _interrupt_after(export, "", signal.SIGINT, 6.0)
    assert got == 130, stderr
    assert stderr.strip().splitlines()[-1] == "accel: interrupted (SIGINT), stopped.", stderr


def test_a_failed_launch_leaves_no_error_files(tmp_path, monkeypatch) -> None:
    import operator
    import tempfile

    from accel.launch import LaunchError, launch_function

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with pytest.raises(LaunchError, match="rank [01] failed: ZeroDivisionError"):  # both ranks fail
        launch_function(LaunchSpec(devices=2), operator.truediv, 1, 0)
    # torch.multiprocessing gives each worker a pytorch-errorfile-*.pickle in tempfile's folder.
    assert not list(temp.glob("pytorch-errorfile-*"))
