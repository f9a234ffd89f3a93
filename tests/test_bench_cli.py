"""``accel bench``: the speed suite's CPU dry run, its report, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from accel.cli.app import app

runner = CliRunner()


def test_speed_suite_dry_run_and_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from accel.bench import speed

    saved: list[tuple[list[str], bool]] = []
    real_save = speed.save

    def recorded(result: dict, path: Path) -> None:
        saved.append((list(result["configs"]), result["complete"]))
        real_save(result, path)

    monkeypatch.setattr(speed, "save", recorded)
    out = tmp_path / "tiny.json"
    args = ["bench", "--model", "sdxl", "--tiny", "--configs", "A,S,C", "--steps", "2", "--repeat", "1"]
    engines = tmp_path / "engines"  # holds none: S compiles in memory and the run says so
    result = runner.invoke(
        app, [*args, "--height", "64", "--width", "64", "--engines", str(engines), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["configs"]) == {"A", "S-inductor", "C"}
    assert data["engines"] == {"inductor": str(engines)} and data["engine_tuning"] == {"inductor": {}}
    # Each one-GPU configuration is saved as soon as it is measured: a run cut short keeps them.
    assert saved == [(["A"], False), (["A", "S-inductor"], False), (["A", "S-inductor", "C"], True)]
    assert data["tiny"] is True and data["steps"] == 2 and data["expert_mode"] == "max-autotune"
    # S is accel on one device, compiled: the same math as A up to the compiler's reordering.
    assert data["configs"]["S-inductor"]["latent_max_abs_err"] < 1e-3
    assert data["configs"]["S-inductor"]["compiled_stages"] >= 1
    # What the compiler did in each configuration's warm-up: nothing for eager A; for S, the work its
    # stages' own accounting counted (compiled in memory: graphs generated, none loaded).
    s_entry = data["configs"]["S-inductor"]
    assert data["configs"]["A"]["warmup_compiler_work"] == dict.fromkeys(
        ("graphs_generated", "graphs_cached", "kernel_benchmarks"), 0
    )
    assert s_entry["warmup_compiler_work"] == s_entry["compiler_work"]
    assert s_entry["compiler_work"]["graphs_generated"] + s_entry["compiler_work"]["graphs_cached"] >= 1
    assert s_entry["stage_first_call_seconds"] > 0.0
    c = data["configs"]["C"]
    # C is exact CFG split: its latents match A's up to batch-1 vs batch-2 rounding.
    assert c["latent_max_abs_err"] < 1e-3
    assert data["ratios"]["C"]["loop_vs_A"] == data["configs"]["A"]["loop_median_s"] / c["loop_median_s"]
    assert c["per_rank"][1]["bytes_sent"] > 0
    # Each timed configuration says how busy the host's other processes kept its CPUs meanwhile.
    assert all(isinstance(data["configs"][n]["other_cpu_cores"], float) for n in ("A", "S-inductor"))

    report = runner.invoke(app, ["bench", "--report", str(out)])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "README.md").read_text()
    assert "| C | accel CFG split, eager, 2 GPUs |" in text
    assert "| S-inductor | accel, inductor, 1 GPU |" in text
    assert f"engines {engines} (inductor)." in text
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert "cut short" not in text
    # The warm-up's compiler work is named for the compiled configuration, with its counts, not for A.
    w = data["configs"]["S-inductor"]["warmup_compiler_work"]
    said = f"S-inductor: {w['graphs_generated']} graph(s) generated, {w['graphs_cached']} read from the cache"
    assert said in text
    assert "A: 0 graph(s)" not in text

    # A run cut short (as its partial saves leave it) says so and names what it measured.
    partial = tmp_path / "partial" / "cut.json"
    partial.parent.mkdir()
    del data["configs"]["C"], data["ratios"]["C"]
    data["configs"]["A"]["other_cpu_cores"] = 9.25
    data["configs"]["S-inductor"]["other_cpu_cores"] = 0.2
    partial.write_text(
        json.dumps({**data, "complete": False, "engine_tuning": {"cfg.full.64x64.b2": "fused_qkv"}})
    )
    assert runner.invoke(app, ["bench", "--report", str(partial)]).exit_code == 0
    text = (partial.parent / "README.md").read_text()
    assert "The run was cut short: measured A, S-inductor of A, S, C requested." in text
    assert "Engines' tuning: `cfg.full.64x64.b2` fused_qkv." in text  # one directory (earlier results)
    per_backend = {"inductor": {"cfg.b2": "fused_qkv"}, "aot": {"cfg.b2": "coordinate_descent"}}
    partial.write_text(json.dumps({**data, "engine_tuning": per_backend}))
    assert runner.invoke(app, ["bench", "--report", str(partial)]).exit_code == 0
    text = (partial.parent / "README.md").read_text()
    assert "Engines' tuning: inductor `cfg.b2` fused_qkv; aot `cfg.b2` coordinate_descent." in text
    # A row timed on a contended host is named as such; a quiet one is not.
    assert "Timed while other processes kept CPU cores busy: A (9.2)." in text
    assert "S-inductor (" not in text


def test_bench_refuses_bad_input(tmp_path: Path) -> None:
    none = runner.invoke(app, ["bench"])
    assert none.exit_code != 0 and "choose one suite" in none.output
    gpus = runner.invoke(app, ["bench", "--model", "sdxl", "-o", str(tmp_path / "x.json")])
    assert gpus.exit_code == 1 and "needs 2 CUDA GPUs" in gpus.output
    assert "needs 2 CUDA GPUs" in gpus.stderr and not gpus.stdout  # an error, not a result
    one = runner.invoke(
        app, ["bench", "--model", "sdxl", "--configs", "A,B*,S", "-o", str(tmp_path / "x.json")]
    )
    assert one.exit_code == 1 and "needs 1 CUDA GPU for --configs A,B*,S" in one.output
    extra = ["--engines", "e1", "--engines", "e2"]
    two = runner.invoke(app, ["bench", "--model", "sdxl", "--tiny", *extra], env={"COLUMNS": "250"})
    assert two.exit_code != 0 and "2 engine directories for 1 backend(s) (inductor)" in two.output
    bad = runner.invoke(app, ["bench", "--model", "sdxl", "--tiny", "--configs", "A,Z"])
    assert bad.exit_code != 0 and "unknown configurations ['Z']" in bad.output
    from accel.bench.report import describe

    # B*'s compile mode is part of its description (results without it used max-autotune).
    assert describe("B*").endswith("torch.compile (max-autotune), 1 GPU")
    assert describe("B*", "reduce-overhead").endswith("torch.compile (reduce-overhead), 1 GPU")
    mode = runner.invoke(
        app, ["bench", "--model", "sdxl", "--tiny", "--expert-mode", "fast"], env={"COLUMNS": "250"}
    )
    assert (
        mode.exit_code != 0
        and "expert mode 'fast' is not one of max-autotune, reduce-overhead" in mode.output
    )
    missing = runner.invoke(app, ["bench", "--report", str(tmp_path / "nope.json")])
    assert missing.exit_code == 1 and "no such result file" in missing.output
    assert not (tmp_path / "x.json").exists()


def test_the_expert_baseline_applies_the_recipe_and_puts_the_pipeline_back() -> None:
    import torch

    from accel.bench.speed import RECIPE_INDUCTOR, _expert_compiled
    from accel.testing import build_pipeline

    pipe = build_pipeline("sdxl")
    unet, vae = pipe.unet, pipe.vae
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    conv = next(p for p in unet.parameters() if p.dim() == 4)
    with _expert_compiled(pipe):
        import torch._inductor.config as inductor_config

        assert all(getattr(inductor_config, k) == v for k, v in RECIPE_INDUCTOR.items())
        assert pipe.unet is not unet and "decode" in vars(vae)  # both compiled (lazily)
        assert any("to_qkv" in name for name, _ in unet.named_parameters())  # q/k/v fused
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert pipe.unet is unet and "decode" not in vars(vae)
    assert not any("to_qkv" in name for name, _ in unet.named_parameters())
    assert conv.is_contiguous()
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
