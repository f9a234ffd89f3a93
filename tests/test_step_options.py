"""benchmarks/step_options.py: option parsing, the kernel kinds of its profile, and a CPU dry run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_options.py"


@pytest.fixture(scope="module")
def step_options() -> ModuleType:
    spec = importlib.util.spec_from_file_location("step_options", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_combine_and_refuse_what_cannot_apply(step_options: ModuleType) -> None:
    assert step_options.atoms("recipe+cudnn-benchmark") == (
        "conv_1x1_as_mm",
        "coordinate_descent",
        "fused_qkv",
        "cudnn-benchmark",
    )
    # Coordinate descent as accel's inductor engines build it: through Triton's own kernel launcher.
    assert step_options.inductor_options("coordinate_descent+fused_qkv") == {
        "coordinate_descent_tuning": True,
        "use_static_cuda_launcher": False,
    }
    with pytest.raises(SystemExit, match="'fast' is not one of"):
        step_options.atoms("default+fast")
    with pytest.raises(SystemExit, match="inductor settings do not apply to eager"):
        step_options.atoms("eager+autotune")


@pytest.mark.parametrize(
    ("kernel", "kind"),
    [
        (
            "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0",
            "attention",
        ),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
        ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
        ("cudnn_generated_fort_native_conv_sm90_fprop_wgmma", "convolution"),
        ("triton_tem_fused_convolution_3", "convolution"),
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matrix product"),
        ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNT", "matrix product"),
        ("triton_tem_fused_mm_1", "matrix product"),
        ("triton_per_fused_native_group_norm_silu_0", "triton generated"),
        ("void at::native::elementwise_kernel<128, 2>", "other"),
    ],
)
def test_kernels_are_sorted_by_kind(step_options: ModuleType, kernel: str, kind: str) -> None:
    assert step_options.kind_of(kernel) == kind


def test_cpu_dry_run_writes_rows_and_puts_cudnn_benchmark_back(
    step_options: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "step"
    args = ["--tiny", "--model", "sdxl", "--size", "64", "--device", "cpu", "--batch", "1", "--warmup", "0"]
    args += ["--repeat", "1", "--options", "eager,eager+cudnn-benchmark,eager+fused_qkv", "-o", str(out)]
    monkeypatch.setattr(sys, "argv", ["step_options.py", *args])
    before = torch.backends.cudnn.benchmark
    step_options.main()
    assert torch.backends.cudnn.benchmark == before
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {row["option"]: row for row in result["rows"]}
    assert list(rows) == ["eager", "eager+cudnn-benchmark", "eager+fused_qkv"]
    # Eager against eager: the same call, the same numbers; fused q/k/v only reorders the projections.
    assert rows["eager"]["max_abs_diff"] == 0 and rows["eager+cudnn-benchmark"]["max_abs_diff"] == 0
    assert rows["eager+fused_qkv"]["max_abs_diff"] < 1e-4
    # Eager rows compile nothing: no graphs, no kernel benchmarks in their first call.
    nothing = {"graphs_generated": 0, "graphs_cached": 0, "kernel_benchmarks": 0}
    assert all(row["compiler_work"] == nothing for row in rows.values())
    assert "| 1 | eager+cudnn-benchmark |" in out.with_suffix(".md").read_text()
    assert not result.get("failed")


def test_flops_are_counted_by_kernel_kind_exactly(step_options: ModuleType) -> None:
    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(8, 16), torch.nn.Conv2d(3, 5, kernel_size=3)
    x, image = torch.randn(4, 8), torch.randn(1, 3, 6, 6)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    a, b = torch.randn(3, 4, 5), torch.randn(3, 5, 2)

    def call() -> torch.Tensor:
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return linear(x).sum() + conv(image).sum() + attended.sum() + torch.bmm(a, b).sum()

    out, flops = step_options.counted(call)
    assert torch.equal(out, call())  # counting changes nothing
    assert flops == {
        "matrix product": 2 * 4 * 8 * 16 + 2 * 3 * 4 * 5 * 2,  # the linear layer and a bmm outside attention
        "convolution": 2 * 5 * 4 * 4 * 3 * 3 * 3,
        "attention": 2 * 2 * 4 * 6 * (8 + 8),  # q k^T and p v
    }
    assert step_options.flop_kind("aten.addmm") == "matrix product"
    assert step_options.flop_kind("aten.convolution") == "convolution"
    assert step_options.flop_kind("aten.add") == "other"
