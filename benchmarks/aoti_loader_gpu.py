"""Can this torch build load AOTInductor packages? A three-layer MLP, exported with and without its
weights, loaded in child processes (a crash there is reported, not fatal), each once as a plain process
and once after :func:`accel.compile.cxxruntime.share_libstdcxx` (what accel's ``aot`` backend does).

    python benchmarks/aoti_loader_gpu.py [--device cuda|cpu]

On torch 2.11.0+cu130 (our H200 host) the plain loads crash with SIGSEGV (docs/engines.md says why);
accel's ``aot`` backend shares the C++ runtime first and checks the loader in a child process before its
first CUDA load (``AOTBackend.check_loader``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor

from accel.compile.cxxruntime import share_libstdcxx


def _mlp(device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and its input, identical in the exporting and the loading process (seeded)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64))
    dtype = torch.float16 if device == "cuda" else torch.float32
    return model.to(device, dtype).eval(), torch.randn(8, 256, device=device, dtype=dtype)


def _load(path: str, device: str, weights: bool, share: bool) -> None:
    """Child process: load the package, bind the weights if it holds none, print the max abs error."""
    if share:
        share_libstdcxx()
    runner = torch._inductor.aoti_load_package(path, **({"device_index": 0} if device == "cuda" else {}))
    model, x = _mlp(device)
    if not weights:
        named = dict(model.named_parameters())
        constants = {n: named[n].detach() for n in runner.get_constant_fqns()}
        runner.load_constants(constants, check_full_update=True, user_managed=True)
    with torch.no_grad():
        print(float((runner(x) - model(x)).abs().max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--load", nargs=3, metavar=("PACKAGE", "WEIGHTS", "SHARE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        _load(args.load[0], args.device, args.load[1] == "1", args.load[2] == "1")
        return
    model, x = _mlp(args.device)
    program = torch.export.export(model, (x,), strict=False)
    print(f"torch {torch.__version__}, {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        for weights in (True, False):
            path = Path(tmp) / f"mlp-{'weights' if weights else 'code'}.pt2"
            start = time.perf_counter()
            configs = {} if weights else {"aot_inductor.package_constants_in_so": False}
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path), inductor_configs=configs
            )
            exported = time.perf_counter() - start
            for share in (False, True):
                child = [sys.executable, __file__, "--device", args.device, "--load", str(path)]
                proc = subprocess.run(
                    [*child, str(int(weights)), str(int(share))], capture_output=True, text=True, check=False
                )
                if proc.returncode == 0:
                    outcome = f"loaded, max abs diff {proc.stdout.strip().splitlines()[-1]}"
                elif proc.returncode < 0:
                    outcome = f"load crashed (signal {-proc.returncode})"
                else:
                    outcome = f"load failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
                how = "shared C++ runtime" if share else "plain process"
                print(
                    f"{'with' if weights else 'without'} weights, {how}: export {exported:.1f} s, {outcome}"
                )


if __name__ == "__main__":
    main()
