"""Compiled stages inside wrapped pipelines: ``backend=`` compiles in memory, ``engines=`` loads without compiling."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import accel
from accel.cli.app import app
from accel.compile.runner import StaleWeightsError
from accel.compile.store import EngineError, EngineStore
from accel.testing import build_pipeline

STEPS = 3
HEIGHT = WIDTH = 64  # tiny SD3: 8x8 latents, 16 tokens


def _generate(pipe: Any, steps: int = STEPS, output_type: str = "latent") -> torch.Tensor:
    return pipe(
        prompt="a handwritten seven",
        num_inference_steps=steps,
        guidance_scale=5.0,
        height=HEIGHT,
        width=WIDTH,
        output_type=output_type,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images


def _refuse_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count every way a stage could be compiled or exported as a failure."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("this run must not compile")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)
    monkeypatch.setattr(torch.export, "export", refuse)
    monkeypatch.setattr(torch, "compile", refuse)


@pytest.fixture(scope="module")
def pipe_and_reference() -> tuple[Any, torch.Tensor]:
    pipe = build_pipeline("sd3")
    with torch.no_grad():
        return pipe, _generate(pipe)


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-device plan of the tiny SD3 (`accel plan --devices 1`) for one prompt at 64x64."""
    path = tmp_path_factory.mktemp("plan") / "sd3-64-1dev.plan.json"
    args = ["plan", "--demo", "sd3", "--height", str(HEIGHT), "--width", str(WIDTH), "--devices", "1"]
    made = CliRunner().invoke(
        app, [*args, "--device", "cpu", "--warmup", "0", "--repeat", "1", "-o", str(path)]
    )
    assert made.exit_code == 0, made.output
    return path


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, plan_file: Path) -> Path:
    """AOT engines of the one-device plan, written by `accel export`: the CFG batch of 2 runs whole, so
    the exported key is ``cfg.full.64x64.b2``, and the decoder sees one image."""
    directory = tmp_path_factory.mktemp("engines") / "engines"
    done = CliRunner().invoke(app, ["export", str(plan_file), "--backend", "aot", "-o", str(directory)])
    assert done.exit_code == 0, done.output
    assert sorted(EngineStore(directory).records()) == [
        f"cfg.full.{HEIGHT}x{WIDTH}.b2",
        "vae.decoder.8x8.b1.float32",
    ]
    return directory


def test_engines_load_without_compiling(
    pipe_and_reference: tuple[Any, torch.Tensor], engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe, reference = pipe_and_reference
    _refuse_compiling(monkeypatch)
    wrapped = accel.wrap(pipe, accelerator="cpu", backend="aot", engines=str(engines), strict=True)
    try:
        out = _generate(wrapped)
        image = _generate(wrapped, output_type="pt")  # through the VAE decoder's engine
        report = wrapped.last_report
    finally:
        accel.unwrap(wrapped)
    assert (report.loaded_stages, report.compiled_stages, report.eager_stages) == (2, 0, 0)
    assert float((out - reference).abs().max()) <= 1e-5
    with torch.no_grad():
        eager_image = _generate(pipe, output_type="pt")
    assert float((image - eager_image).abs().max()) <= 1e-5
    assert "forward" not in vars(pipe.vae.decoder)
    assert "forward" not in vars(pipe.transformer)  # unwrap removed the hooks


def test_engines_serve_other_weights_of_the_same_graph(
    engines: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fine-tune of the same architecture (a pipeline built from another seed) reuses the aot engines:
    nothing is compiled, the output is that pipeline's own, and the weights difference is reported."""
    other = build_pipeline("sd3", seed=1)
    with torch.no_grad():
        reference = _generate(other)
        eager_image = _generate(other, steps=1, output_type="pt")
    _refuse_compiling(monkeypatch)
    wrapped = accel.wrap(other, accelerator="cpu", backend="aot", engines=str(engines), strict=True)
    try:
        with caplog.at_level(logging.WARNING, logger="accel.compile.store"):
            out = _generate(wrapped)
        image = _generate(wrapped, steps=1, output_type="pt")
        report = wrapped.last_report
    finally:
        accel.unwrap(wrapped)
    assert (report.loaded_stages, report.compiled_stages, report.eager_stages) == (2, 0, 0)
    assert float((out - reference).abs().max()) <= 1e-5
    assert float((image - eager_image).abs().max()) <= 1e-5
    assert caplog.text.count("built for other weights") == 2  # the denoiser's and the decoder's engine
    assert "serves these without recompiling" in caplog.text


def test_engines_for_another_graph_are_refused(engines: Path) -> None:
    """Same weights seed, one transformer block fewer: the stage's graph differs, so the engine is refused."""
    from diffusers import SD3Transformer2DModel

    pipe = build_pipeline("sd3")
    config = {**pipe.transformer.config, "num_layers": pipe.transformer.config.num_layers - 1}
    pipe.transformer = SD3Transformer2DModel.from_config(config).eval()
    wrapped = accel.wrap(
        pipe, accelerator="cpu", backend="aot", engines=str(engines), compile_vae=False, strict=True
    )
    try:
        with pytest.raises(EngineError, match="the stage's graph differs") as info:
            _generate(wrapped, steps=1)
    finally:
        accel.unwrap(wrapped)
    assert "re-export" in str(info.value)


@pytest.mark.parametrize("backend", ["aot", "inductor"])
def test_weights_changed_after_wrapping_are_followed(
    backend: str, engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights edited in place are seen by the next call; weights replaced by new tensors are bound again
    before the next call (no recompilation), or refused when the new tensors change the graph."""
    pipe, twin = build_pipeline("sd3", seed=2), build_pipeline("sd3", seed=2)  # twin: eager reference
    new_weights = {k: v.clone() for k, v in build_pipeline("sd3", seed=3).transformer.state_dict().items()}
    store = str(engines) if backend == "aot" else None
    wrapped = accel.wrap(
        pipe, accelerator="cpu", backend=backend, engines=store, compile_vae=False, strict=True
    )
    try:
        _generate(wrapped, steps=1)  # compiles or loads the stage, bound to the weights of now
        _refuse_compiling(monkeypatch)
        with torch.no_grad():
            for model in (pipe.transformer, twin.transformer):
                model.proj_out.weight.mul_(0.5)  # in place: same memory
            in_place = _generate(wrapped)
            expected = _generate(twin)
        assert float((in_place - expected).abs().max()) <= 1e-5
        assert wrapped.last_report.rebound_stages == 0

        pipe.transformer.load_state_dict(new_weights, assign=True)  # new tensors: old pointers are stale
        twin.transformer.load_state_dict(new_weights)
        with torch.no_grad():
            replaced = _generate(wrapped)
            expected = _generate(twin)
        assert float((replaced - expected).abs().max()) <= 1e-5
        report = wrapped.last_report
        assert (report.rebound_stages, report.compiled_stages + report.loaded_stages) == (1, 1)

        weight = pipe.transformer.proj_out.weight
        pipe.transformer.proj_out.weight = torch.nn.Parameter(weight.detach().double(), requires_grad=False)
        with pytest.raises(
            StaleWeightsError, match=r"change its graph \(model.proj_out.weight was .* now .*torch.float64"
        ):
            _generate(wrapped, steps=1)
    finally:
        accel.unwrap(wrapped)


def test_vae_weights_loaded_after_wrapping_are_followed(
    engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled decoder runs on a private copy of the VAE decoder; weights loaded into the pipeline's
    VAE after wrapping (copied in place, or assigned as new tensors) reach it before the next decode."""
    pipe, twin = build_pipeline("sd3", seed=4), build_pipeline("sd3", seed=4)
    vae_of = {seed: build_pipeline("sd3", seed=seed).vae.state_dict() for seed in (5, 6)}
    wrapped = accel.wrap(pipe, accelerator="cpu", backend="aot", engines=str(engines), strict=True)
    try:
        _generate(wrapped, steps=1, output_type="pt")
        _refuse_compiling(monkeypatch)
        for seed, assign in ((5, False), (6, True)):
            pipe.vae.load_state_dict({k: v.clone() for k, v in vae_of[seed].items()}, assign=assign)
            twin.vae.load_state_dict(vae_of[seed])
            with torch.no_grad():
                image = _generate(wrapped, steps=1, output_type="pt")
                expected = _generate(twin, steps=1, output_type="pt")
            assert float((image - expected).abs().max()) <= 1e-5, f"VAE weights of seed {seed}"
        assert wrapped.last_report.compiled_stages == 0
    finally:
        accel.unwrap(wrapped)


def test_one_device_export_loads_every_stage_in_accel_run(
    plan_file: Path, engines: Path, tmp_path: Path
) -> None:
    """`accel export` of a one-device plan, then `accel run --devices 1 --engines`: every engine loads,
    nothing compiles (the CFG stage at the unsplit batch of 2, and the VAE decoder)."""
    out = tmp_path / "seven.png"
    args = ["run", str(plan_file), "--devices", "1", "--accelerator", "cpu", "--engines", str(engines)]
    result = CliRunner().invoke(
        app, [*args, "--strict", "--steps", "2", "-p", "a seven", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    [call] = json.loads(result.stdout)["calls"]
    stages = len(EngineStore(engines).records())
    assert (call["loaded_stages"], call["compiled_stages"], call["eager_stages"]) == (stages, 0, 0)
    assert call["compiler_work"] == {"graphs_generated": 0, "graphs_cached": 0, "kernel_benchmarks": 0}
    assert call["stage_first_call_seconds"] > 0.0
    assert out.is_file()


def test_inductor_backend_matches_eager_including_the_vae(
    pipe_and_reference: tuple[Any, torch.Tensor],
) -> None:
    pipe, reference = pipe_and_reference
    wrapped = accel.wrap(pipe, accelerator="cpu", backend="inductor", strict=True)
    try:
        out = _generate(wrapped)
        again = _generate(wrapped)
        image = _generate(wrapped, steps=1, output_type="pt")  # through the VAE decoder
        report = wrapped.last_report
    finally:
        accel.unwrap(wrapped)
    eager_image = _generate(pipe, steps=1, output_type="pt")
    assert float((out - reference).abs().max()) <= 1e-5
    assert torch.equal(out, again)  # replays give the same result
    assert float((image - eager_image).abs().max()) <= 1e-5
    # The denoiser and the decoder, compiled once each and reused by every call.
    assert (report.compiled_stages, report.loaded_stages, report.eager_stages) == (2, 0, 0)


def test_engines_need_a_compiled_backend() -> None:
    with pytest.raises(accel.SettingsError, match="engines= needs a compiled backend"):
        accel.AccelSettings(engines="somewhere")
