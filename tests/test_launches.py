"""Tuned launch parameters inside inductor engine files: packed beside torch's cache artifacts, written
back into inductor's cache folder at load, older files (artifacts alone) still read, damage refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.compiler._cache import CacheInfo

from accel.compile import launches
from accel.compile.backends import InductorBackend, get_backend
from accel.settings import Tuning

KEY = "ab/cabc123.best_config"
ENTRY = b'{"XBLOCK": 512, "num_warps": 8, "found_by_coordesc": true}'


def test_pack_and_unpack_round_trip_and_leave_plain_artifacts_alone() -> None:
    artifacts = b"torch artifact bytes \x00\xff"
    assert launches.pack(artifacts, {}) == artifacts  # nothing tuned: the file is torch's bytes alone
    assert launches.unpack(artifacts) == (artifacts, {})  # engines exported before the layout
    packed = launches.pack(artifacts, {KEY: ENTRY, "cd/other.best_config": b"{}"})
    assert packed.startswith(launches.MAGIC) and packed.endswith(artifacts)
    assert launches.unpack(packed) == (artifacts, {KEY: ENTRY, "cd/other.best_config": b"{}"})


def test_damaged_or_escaping_launch_files_are_refused() -> None:
    packed = launches.pack(b"artifacts", {KEY: ENTRY})
    with pytest.raises(launches.LaunchesError, match="truncated inside its tuned launch parameters"):
        launches.unpack(packed[: len(launches.MAGIC) + 12])
    header_at = len(launches.MAGIC) + 8
    damaged = packed[:header_at] + b"[" + packed[header_at + 1 :]
    with pytest.raises(launches.LaunchesError, match="unreadable .* re-export"):
        launches.unpack(damaged)
    for key in ("../../etc/passwd", "/tmp/x.best_config", ""):
        with pytest.raises(launches.LaunchesError, match="not a path inside inductor's cache"):
            launches.unpack(launches.pack(b"a", {key: b"{}"}))


def test_tuned_launches_reads_the_recorded_files_as_they_are_now(tmp_path: Path) -> None:
    (tmp_path / "ab").mkdir()
    (tmp_path / KEY).write_bytes(ENTRY)
    info = CacheInfo()
    info.artifacts["autotune"].extend([KEY, "zz/gone.best_config"])  # a file no longer there is skipped
    info.artifacts["inductor"].append("fxgraph-key")
    assert launches.tuned_launches(info, root=tmp_path) == {KEY: ENTRY}
    assert launches.tuned_launches(CacheInfo(), root=tmp_path) == {}


def test_inductor_engine_load_writes_its_launch_files_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).eval()
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    backend = get_backend("inductor", Tuning(coordinate_descent=True))
    torch._dynamo.reset()
    with caplog.at_level("INFO", logger="accel.compile.backends"):
        path = backend.export(module, (x,), tmp_path / "mlp.inductor")
    # The export says how many it carries (on the CPU inductor generates C++, so nothing is searched).
    assert "inductor mlp.inductor: 0 tuned kernel launch file(s) carried" in caplog.text
    artifacts, tuned = launches.unpack(path.read_bytes())
    assert tuned == {}  # nothing searched: the file is torch's artifacts alone
    path.write_bytes(launches.pack(artifacts, {KEY: ENTRY}))
    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    torch._dynamo.reset()
    fn = backend.load(path, module=module)
    assert (cache / KEY).read_bytes() == ENTRY
    with torch.no_grad():
        torch.testing.assert_close(fn(x), module(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_coordinate_descent_engines_use_tritons_own_launcher() -> None:
    """torch 2.11's static launcher drops the mark that a cached kernel's launch parameters came from a
    search, so a loaded engine searched again (GPU host: 68 benchmark calls on a small block, none with
    Triton's launcher)."""
    tuned = InductorBackend().tuned(Tuning(coordinate_descent=True))._how()
    assert tuned == {"options": {"coordinate_descent_tuning": True, "use_static_cuda_launcher": False}}
    assert InductorBackend().tuned(Tuning(fused_qkv=True))._how() == {"mode": None}
