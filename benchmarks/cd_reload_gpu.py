"""Does an inductor engine built with coordinate-descent tuning search again when it is loaded?

    python benchmarks/cd_reload_gpu.py -o cd-reload.json

For each variant, one process compiles a small fp16 CUDA block (group norm, attention projections,
layer norm, GEGLU; a few generated kernels) with inductor's ``coordinate_descent_tuning`` into an empty
compiler cache and saves torch's portable cache artifacts, as ``accel export --backend inductor`` does;
a second process, with another empty cache,, installs them, compiles the same block and calls it once,
as ``accel run --engines`` does. The second process's compiler counters (:class:`CompilerWork`) say what
its first call did: graphs generated, graphs read from the cache, kernel benchmark calls (a search).

Variants: ``static``: torch's defaults (its static CUDA launcher on); ``no-static``: the static launcher
off; ``accel``: accel's own ``inductor`` backend with ``--tune coordinate_descent``. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"static": {"use_static_cuda_launcher": True}, "no-static": {"use_static_cuda_launcher": False}}


def _module(name: str):  # noqa: ANN202 - torch is imported in the child processes only
    """The module compiled and its inputs: ``block`` (a small attention block, fp16), ``vae`` (SDXL's
    full-size VAE decoder, fp32 as diffusers decodes, 32x32 latent) or ``unet`` (SDXL's full-size U-Net,
    fp16, 16x16 latent: every kernel of the real one at a size that searches quickly)."""
    import torch

    if name in ("vae", "unet"):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from accel.testing.pipelines import full_size_config

        torch.manual_seed(0)
        config = full_size_config("sdxl")[name]
        if name == "vae":
            vae = AutoencoderKL.from_config(config).to("cuda").eval()

            class Decode(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.vae = vae

                def forward(self, z: torch.Tensor) -> torch.Tensor:
                    return self.vae.decode(z).sample

            return Decode(), (torch.randn(1, 4, 32, 32, device="cuda"),)
        unet = UNet2DConditionModel.from_config(config).to("cuda", torch.float16).eval()

        class Denoise(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.unet = unet

            def forward(self, x, t, text, pooled, time_ids):  # noqa: ANN001, ANN201
                cond = {"text_embeds": pooled, "time_ids": time_ids}
                return self.unet(x, t, text, added_cond_kwargs=cond).sample

        h = dict(device="cuda", dtype=torch.float16)
        inputs = (
            torch.randn(1, 4, 16, 16, **h),
            torch.tensor([500.0], device="cuda"),
            torch.randn(1, 77, 2048, **h),
            torch.randn(1, 1280, **h),
            torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]], **h),
        )
        return Denoise(), inputs

    class Block(torch.nn.Module):
        def __init__(self, dim: int = 640) -> None:
            super().__init__()
            self.norm = torch.nn.GroupNorm(32, dim)
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.out = torch.nn.Linear(dim, dim)
            self.ln = torch.nn.LayerNorm(dim)
            self.up = torch.nn.Linear(dim, 8 * dim)
            self.down = torch.nn.Linear(4 * dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, h, w = x.shape
            t = self.norm(x).flatten(2).transpose(1, 2)
            q, k, v = self.qkv(t).view(b, -1, 3, 10, c // 10).permute(2, 0, 3, 1, 4)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            t = t + self.out(a.transpose(1, 2).reshape(b, -1, c))
            hidden, gate = self.up(self.ln(t)).chunk(2, dim=-1)
            t = t + self.down(hidden * torch.nn.functional.gelu(gate))
            return x + t.transpose(1, 2).reshape(b, c, h, w)

    torch.manual_seed(0)
    module = Block().to("cuda", torch.float16).eval()
    return module, (torch.randn(1, 640, 64, 64, device="cuda", dtype=torch.float16),)


def _kernels() -> dict[str, int]:
    """The Triton kernels loaded in this process, counted by kind and by what the autotune cache answered
    when they were loaded (whether a kernel was searched again is not visible on the kernel itself: the
    compiler's ``kernel_benchmarks`` counts the searches)."""
    from collections import Counter

    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    modules = getattr(PyCodeCache, "modules", [])
    modules = list(modules.values()) if isinstance(modules, dict) else list(modules)
    found = {id(v): v for m in modules for v in vars(m).values() if isinstance(v, CachingAutotuner)}
    counts: Counter[str] = Counter()
    for k in found.values():
        kind = str(getattr(k, "heuristic_type", "?")).rsplit(".", 1)[-1].lower()
        cache = (getattr(k, "autotune_cache_info", None) or {}).get("autotune_cache_state", "none")
        counts[f"{kind} cache={cache}"] += 1
    return dict(sorted(counts.items()))


def _child(module_name: str, role: str, variant: str, path: str) -> dict:
    """``role`` ``export``: compile and save the artifacts to ``path``; ``load``: install them, compile,
    call once. Returns the seconds and the compiler's work."""
    import torch

    from accel.compile.work import CompilerWork

    module, inputs = _module(module_name)
    started, before = time.perf_counter(), CompilerWork.now()
    if variant == "accel":
        from accel.compile.backends import get_backend
        from accel.settings import Tuning

        backend = get_backend("inductor", Tuning(coordinate_descent=True))
        if role == "export":
            backend.export(module, inputs, path)
        else:
            fn = backend.load(path, module=module)
            with torch.no_grad():
                fn(*inputs)
    else:
        options = {"coordinate_descent_tuning": True, **VARIANTS[variant]}
        if role == "load":
            torch.compiler.load_cache_artifacts(Path(path).read_bytes())
        fn = torch.compile(module, dynamic=False, fullgraph=True, options=options)
        with torch.no_grad():
            fn(*inputs)
        if role == "export":
            blob, _ = torch.compiler.save_cache_artifacts()
            Path(path).write_bytes(blob)
    torch.cuda.synchronize()
    work = CompilerWork.now().since(before)
    return {"seconds": round(time.perf_counter() - started, 2), **vars(work), "kernels": _kernels()}


def _run(module: str, role: str, variant: str, path: Path, cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    cmd = [sys.executable, __file__, "--child", module, role, variant, str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1], "rc": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--module", choices=("block", "vae", "unet"), default="block")
    p.add_argument("--variants", default="static,no-static,accel")
    p.add_argument("-o", "--output", default="cd-reload.json")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            path = Path(tmp) / f"{variant}.bin"
            row = {"module": args.module, "variant": variant}
            row["export"] = _run(args.module, "export", variant, path, Path(tmp) / f"{variant}-a")
            row["load"] = _run(args.module, "load", variant, path, Path(tmp) / f"{variant}-b")
            # again into the cache the first load filled
            row["load_again"] = _run(args.module, "load", variant, path, Path(tmp) / f"{variant}-b")
            rows.append(row)
            sys.stderr.write(json.dumps(row) + "\n")
    result = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
