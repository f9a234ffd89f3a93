"""Settings are validated once, up front, with messages that name the fix."""

from __future__ import annotations

import pytest
import torch

import accel
from accel.runtime.guidance import BatchSplit, slice_batch
from accel.testing import build_pipeline


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(devices=3), "world size 3"),
        (dict(devices=1, num_nodes=3, accelerator="cpu"), "odd"),
        (dict(devices=0), "devices must be a positive integer"),
        (dict(strategy="pipefusion"), "strategy='pipefusion' is not supported; choose one of"),
        (dict(backend="magic"), "backend='magic'"),
        (dict(precision="fp8"), "precision='fp8'"),
        (dict(collective_timeout_s=0), "collective_timeout_s"),
    ],
)
def test_bad_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(accel.SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        accel.Accelerator(**kwargs)


def test_missing_gpu_is_refused_before_launch() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(accel.DeviceUnavailableError, match="accelerator='cpu'"):
        accel.Accelerator(devices=2, accelerator="cuda")


def test_wrap_refuses_a_pipeline_without_denoiser() -> None:
    class NotAPipeline:
        components = {"vae": object()}

    with pytest.raises(accel.UnsupportedPipelineError, match=r"pipe.unet.*pipe.transformer"):
        accel.wrap(NotAPipeline(), accelerator="cpu")


def test_wrap_twice_and_settings_twice_are_refused() -> None:
    acc = accel.Accelerator(accelerator="cpu")
    with pytest.raises(accel.SettingsError, match="not both"):
        accel.wrap(object(), accelerator=acc, devices=2)
    pipe = accel.wrap(build_pipeline("sdxl"), accelerator=acc)
    with pytest.raises(ValueError, match="already wrapped"):
        accel.wrap(pipe, accelerator=acc)
    original = accel.unwrap(pipe)
    assert accel.unwrap(original) is original
    with pytest.raises(RuntimeError, match="unwrapped"):
        pipe("a cat", num_inference_steps=1)


def test_single_device_wrap_is_transparent() -> None:
    pipe = build_pipeline("sdxl")
    call = dict(prompt="a cat", num_inference_steps=2, output_type="latent")
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    wrapped = accel.wrap(pipe, accelerator="cpu", devices=1)
    assert wrapped.scheduler is pipe.scheduler  # attributes delegate to the original
    out = wrapped(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(out, expected)
    assert wrapped.last_report.denoiser_calls == 0 and wrapped.last_report.world_size == 1
    assert accel.unwrap(wrapped) is pipe


@pytest.mark.parametrize(
    ("batch", "world", "parts", "rows_of_rank1"),
    [
        (2, 2, 2, slice(1, 2)),
        (6, 2, 2, slice(3, 6)),
        (3, 2, 1, slice(0, 3)),
        (2, 4, 2, slice(0, 1)),
        (8, 4, 4, slice(2, 4)),
    ],
)
def test_batch_split_layout(batch, world, parts, rows_of_rank1) -> None:
    split = BatchSplit.plan(batch, world)
    assert split.parts == parts
    assert split.rows_of(1) == rows_of_rank1


def test_slice_batch_cuts_only_batched_tensors() -> None:
    tree = {
        "sample": torch.arange(4.0).view(4, 1),
        "timestep": torch.tensor(3.0),
        "shared": torch.zeros(2, 7),
        "residuals": (torch.ones(4, 2), [torch.ones(4, 3)]),
        "flag": True,
    }
    out = slice_batch(tree, 4, slice(2, 4))
    assert torch.equal(out["sample"], torch.tensor([[2.0], [3.0]]))
    assert out["timestep"] is tree["timestep"] and out["shared"] is tree["shared"]
    assert out["residuals"][0].shape == (2, 2) and out["residuals"][1][0].shape == (2, 3)
    assert out["flag"] is True
