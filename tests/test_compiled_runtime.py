"""Compiled stages inside wrapped pipelines: ``backend=`` compiles in memory, ``engines=`` loads without compiling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import accel
from accel.compile.engines import export_plan
from accel.compile.store import EngineError
from accel.plan import build_plan
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


@pytest.fixture(scope="module")
def pipe_and_reference() -> tuple[Any, torch.Tensor]:
    pipe = build_pipeline("sd3")
    with torch.no_grad():
        return pipe, _generate(pipe)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, pipe_and_reference: tuple[Any, torch.Tensor]) -> Path:
    """AOT engines of a one-device plan for one prompt: the CFG batch of 2 runs whole, so the exported
    key is ``cfg.full.64x64.b2``, and the decoder sees one image."""
    pipe, _ = pipe_and_reference
    plan = build_plan(
        pipe.transformer,
        source={"kind": "demo", "name": "sd3"},
        height=HEIGHT,
        width=WIDTH,
        devices=1,
        batch=1,
        warmup=0,
        repeat=1,
        count_flops=False,
    )
    directory = tmp_path_factory.mktemp("engines")
    with torch.no_grad():
        records = export_plan(plan, pipe.transformer, "aot", directory, vae=pipe.vae)
    assert [r.key for r in records] == [f"cfg.full.{HEIGHT}x{WIDTH}.b2", "vae.decoder.8x8.b1.float32"]
    return directory


def test_engines_load_without_compiling(
    pipe_and_reference: tuple[Any, torch.Tensor], engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe, reference = pipe_and_reference

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a run from an engine directory must not compile")

    # Every way a stage could be compiled or exported is counted as a failure.
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)
    monkeypatch.setattr(torch.export, "export", refuse)
    monkeypatch.setattr(torch, "compile", refuse)
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


def test_engines_for_other_weights_are_refused(
    pipe_and_reference: tuple[Any, torch.Tensor], engines: Path
) -> None:
    pipe, _ = pipe_and_reference
    weight = pipe.transformer.proj_out.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    try:
        wrapped = accel.wrap(
            pipe, accelerator="cpu", backend="aot", engines=str(engines), compile_vae=False, strict=True
        )
        with pytest.raises(EngineError, match="other weights"):
            _generate(wrapped)
        accel.unwrap(wrapped)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


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
