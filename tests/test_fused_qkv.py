"""Fused q/k/v projections: the same math as the separate ones, engines built with them record it, a run
fuses the live denoiser before loading them (nothing compiled), follows weight edits, and unwrap puts the
model back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import accel
from accel.cli.app import app
from accel.compile.store import EngineStore, record_tuning
from accel.models import fusion
from accel.plan import weights_fingerprint
from accel.testing import build_pipeline

HEIGHT = WIDTH = 64  # tiny SD3: 8x8 latents
STEPS = 2


def _generate(pipe: Any) -> torch.Tensor:
    return pipe(
        prompt="a handwritten seven",
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        height=HEIGHT,
        width=WIDTH,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(7),
    ).images


def _processors(model: torch.nn.Module) -> dict[str, str]:
    return {name: type(p).__name__ for name, p in model.attn_processors.items()}


def _fused_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in fusion.FUSED_MODULES]


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_fusing_keeps_the_output_and_the_fingerprint_follows_edits_and_unfusing_restores(name: str) -> None:
    pipe = build_pipeline(name)
    model = pipe.unet if name == "sdxl" else pipe.transformer
    with torch.no_grad():
        separate = _generate(pipe)
    processors, fingerprint = _processors(model), weights_fingerprint(model)
    fusion.fuse(model)
    assert fusion.is_fused(model) and _fused_modules(model)
    assert weights_fingerprint(model) == fingerprint  # fused copies are not other weights
    with torch.no_grad():
        torch.testing.assert_close(_generate(pipe), separate, rtol=1e-4, atol=1e-5)
        # An in-place edit of an original projection reaches the fused copy only through refresh().
        attention = next(m for m in model.modules() if getattr(m, "fused_projections", False))
        attention.to_q.weight.mul_(1.5)
        stale = _generate(pipe)
        fusion.refresh(model)
        refreshed = _generate(pipe)
        fusion.unfuse(model)
        edited = _generate(pipe)
    assert float((stale - edited).abs().max()) > 1e-3
    torch.testing.assert_close(refreshed, edited, rtol=1e-4, atol=1e-5)
    assert not fusion.is_fused(model) and not _fused_modules(model)
    assert _processors(model) == processors


def test_a_module_without_fusable_projections_is_refused_with_the_fix() -> None:
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    with pytest.raises(fusion.FusionError, match="without fused_qkv in --tune"):
        fusion.fuse(torch.nn.Linear(4, 4))
    # diffusers refuses to fuse attention with added k/v projections (IP-Adapter style processors).
    unet = build_pipeline("sdxl").unet
    processors = dict(unet.attn_processors)
    processors[next(iter(processors))] = AttnAddedKVProcessor()
    unet.set_attn_processor(processors)
    with pytest.raises(
        fusion.FusionError, match="refused: .*added KV projections.* without fused_qkv in --tune"
    ):
        fusion.fuse(unet)
    assert not fusion.is_fused(unet)


def test_fused_engines_are_recorded_and_a_run_fuses_loads_follows_edits_and_unwraps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = tmp_path / "sd3.plan.json"
    args = ["plan", "--demo", "sd3", "--height", str(HEIGHT), "--width", str(WIDTH), "--devices", "1"]
    made = CliRunner().invoke(
        app, [*args, "--device", "cpu", "--warmup", "0", "--repeat", "1", "-o", str(plan)]
    )
    assert made.exit_code == 0, made.output
    engines = tmp_path / "engines"
    done = CliRunner().invoke(
        app, ["export", str(plan), "--backend", "aot", "--tune", "fused_qkv", "--no-vae", "-o", str(engines)]
    )
    assert done.exit_code == 0, done.output
    (record,) = EngineStore(engines).records().values()
    assert record_tuning(record).fused_qkv
    shown = CliRunner().invoke(app, ["inspect", str(engines)], env={"COLUMNS": "250"})
    assert shown.exit_code == 0 and "fused_qkv" in shown.output

    pipe, edited = build_pipeline("sd3"), build_pipeline("sd3")
    processors = _processors(pipe.transformer)
    with torch.no_grad():
        reference = _generate(pipe)
        edited.transformer.transformer_blocks[0].attn.to_k.weight.mul_(0.5)  # made to pipe below, wrapped
        edited_reference = _generate(edited)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("this run must not compile")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)
    monkeypatch.setattr(torch.export, "export", refuse)
    wrapped = accel.wrap(
        pipe, accelerator="cpu", backend="aot", engines=str(engines), compile_vae=False, strict=True
    )
    try:
        out = _generate(wrapped)
        report = wrapped.last_report
        assert fusion.is_fused(pipe.transformer)
        with torch.no_grad():
            pipe.transformer.transformer_blocks[0].attn.to_k.weight.mul_(0.5)  # in place, after loading
        out_edited = _generate(wrapped)
    finally:
        accel.unwrap(wrapped)
    assert (report.loaded_stages, report.compiled_stages, report.eager_stages) == (1, 0, 0)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_edited, edited_reference, rtol=1e-4, atol=1e-5)
    assert not fusion.is_fused(pipe.transformer) and not _fused_modules(pipe.transformer)
    assert _processors(pipe.transformer) == processors
