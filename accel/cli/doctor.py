"""``accel doctor``: what this machine can run, and what to fix.

torch and the compile backends are imported inside the checks: `accel --help` imports this module.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from accel.version import __version__

#: NCCL settings that make accel slower or stop it from using the GPUs' links.
_NCCL_SLOWDOWNS = {
    "NCCL_P2P_DISABLE": "peer-to-peer transfers are off: the pipelined window's tensors go through host memory",
    "NCCL_SHM_DISABLE": "shared-memory transport is off: GPUs without P2P fall back to the network stack",
}


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report: ``ok`` False means ``fix`` says what to do."""

    group: str
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class Report:
    """Everything ``accel doctor`` found (``--json`` prints it as is)."""

    checks: list[Check] = field(default_factory=list)
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    gpus: int = 0
    verdict: str = ""
    ready: bool = False
    fixes: list[str] = field(default_factory=list)

    def add(self, group: str, name: str, ok: bool, detail: str, fix: str = "") -> None:
        self.checks.append(Check(group, name, ok, detail, fix))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvlink_links(count: int) -> dict[int, int] | None:
    """Active NVLink links per GPU through NVML (``nvidia-ml-py``), or ``None`` when NVML is unusable."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        links: dict[int, int] = {}
        for i in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            active = 0
            for link in range(int(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18))):
                try:
                    active += int(
                        pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED
                    )
                except Exception:  # this GPU has fewer links (or none)
                    break
            links[i] = active
        return links
    finally:
        pynvml.nvmlShutdown()


def _nvlink_topology() -> str | None:
    """``nvidia-smi topo -m`` (the GPU connection matrix), or ``None`` without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        return subprocess.run(
            [exe, "topo", "-m"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _check_installation(report: Report) -> None:
    import torch

    report.add("install", "python", True, platform.python_version())
    report.add("install", "accel", True, __version__)
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU-only build"
    report.add("install", "torch", True, f"{torch.__version__}{cuda}")
    for package in ("diffusers", "transformers", "lightning"):
        version = _version(package)
        report.add(
            "install",
            package,
            version is not None,
            version or "not installed",
            "" if version else f"pip install {package}",
        )


def _check_gpus(report: Report) -> int:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    report.gpus = n
    if n == 0:
        why = (
            "this torch is a CPU-only build"
            if not torch.version.cuda
            else f"torch has CUDA {torch.version.cuda}, but no GPU is visible"
        )
        fix = (
            "install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu1XX)"
            if not torch.version.cuda
            else "check the driver with nvidia-smi and CUDA_VISIBLE_DEVICES"
        )
        report.add("devices", "CUDA GPUs", False, f"none ({why}); accel runs on CPU processes (gloo)", fix)
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    for i in range(n):
        major, minor = torch.cuda.get_device_capability(i)
        props = torch.cuda.get_device_properties(i)
        old = major < 7
        report.add(
            "devices",
            f"GPU {i}",
            not old,
            f"{torch.cuda.get_device_name(i)}, sm_{major}{minor}, {props.total_memory / 2**30:.0f} GiB"
            + (", no bf16" if major < 8 else ""),
            "compiled backends and CUDA graphs need sm_70 or newer" if old else "",
        )
    if visible is not None:
        report.add("devices", "CUDA_VISIBLE_DEVICES", True, visible)
    return n


def _check_links(report: Report, n: int) -> None:
    import torch

    if n < 2:
        return
    pairs = [(a, b) for a in range(n) for b in range(n) if a < b]
    missing = [f"{a}<->{b}" for a, b in pairs if not torch.cuda.can_device_access_peer(a, b)]
    report.add(
        "communication",
        "peer-to-peer",
        not missing,
        "every GPU pair" if not missing else f"no P2P for {', '.join(missing)}",
        ""
        if not missing
        else "NCCL goes through host memory: pipelined windows get slower (check IOMMU/ACS)",
    )
    links = _nvlink_links(n)
    if links is not None:
        without = [i for i, k in links.items() if k == 0]
        detail = ", ".join(f"GPU {i}: {k} link(s)" for i, k in links.items())
        report.add(
            "communication",
            "NVLink",
            not without,
            detail,
            ""
            if not without
            else "no NVLink: boundary tensors cross PCIe (fine for CFG split, slower windows)",
        )
    else:
        topology = _nvlink_topology()
        if topology is None:
            report.add("communication", "NVLink", True, "unknown (pip install nvidia-ml-py to check)")
        else:
            found = sorted(set(re.findall(r"\bNV\d+\b", topology)))
            report.add(
                "communication",
                "NVLink",
                bool(found),
                f"nvidia-smi topo: {', '.join(found)}" if found else "nvidia-smi topo shows no NVLink",
                ""
                if found
                else "no NVLink: boundary tensors cross PCIe (fine for CFG split, slower windows)",
            )


def _check_comm(report: Report, n: int) -> None:
    import torch
    import torch.distributed as dist

    if n > 0:
        nccl = None
        if dist.is_available() and dist.is_nccl_available():
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        report.add(
            "communication",
            "NCCL",
            nccl is not None,
            nccl or "not available",
            "" if nccl else "install a CUDA build of torch with NCCL (Linux wheels include it)",
        )
    gloo = dist.is_available() and dist.is_gloo_available()
    report.add(
        "communication", "gloo", gloo, "available" if gloo else "missing", "" if gloo else "reinstall torch"
    )
    for name, why in _NCCL_SLOWDOWNS.items():
        if os.environ.get(name, "0") not in ("", "0"):
            report.add("communication", name, False, f"{name}={os.environ[name]}: {why}", f"unset {name}")


def _check_backends(report: Report, n: int) -> None:
    from accel.compile.backends import BACKEND_NAMES, get_backend

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    triton = importlib.util.find_spec("triton") is not None
    for name in BACKEND_NAMES:
        backend = get_backend(name)
        try:
            reason = backend.available()
        except Exception as exc:  # a broken optional install must not stop the doctor
            reason = f"{type(exc).__name__}: {exc}"
        if reason is None and name in ("inductor", "aot"):
            # These compile generated kernels: C++ on CPU, Triton on GPU.
            if n == 0 and compiler is None:
                reason = "no C++ compiler for CPU kernels; install g++ (apt install g++) or set CXX"
            elif n > 0 and not triton:
                reason = "triton is not installed (CUDA builds of torch ship it: reinstall torch)"
        version = None
        if reason is None:
            try:
                version = backend.version()
            except Exception:
                version = None
        report.backends[name] = {"usable": reason is None, "version": version, "reason": reason}
        report.add(
            "backends",
            name,
            reason is None,
            f"usable ({version})" if reason is None else f"unusable: {reason}",
        )


def _verdict(report: Report) -> None:
    n = report.gpus
    usable = [name for name, b in report.backends.items() if b["usable"]]
    problems = [c for c in report.checks if not c.ok]
    fixes = [f"{c.name}: {c.fix}" for c in problems if c.fix and c.group != "backends"]
    missing_install = any(c.group == "install" for c in problems)
    if missing_install:
        report.verdict = "accel cannot run: required packages are missing."
    elif n == 0:
        report.verdict = (
            "CPU only: accel runs here on CPU processes (gloo) for trying and testing "
            "(accel run --demo sdxl --devices 2 --accelerator cpu); it is not faster on CPUs."
        )
    elif n == 1:
        report.verdict = (
            "1 GPU: guidance splitting needs 2; a compile backend (--backend inductor) still helps."
        )
    else:
        even = n - n % 2
        report.verdict = (
            f"ready: {n} GPUs; CFG split and the hybrid window on {even} (accel run MODEL --devices {even})"
            + ("" if not problems else f"; {len(problems)} item(s) to look at")
            + "."
        )
    report.ready = not missing_install
    report.fixes = fixes
    if n == 0:
        # On CPUs compiled stages do not pay off, and inductor engines compile again at their first use
        # (docs/engines.md): eager, or onnx engines for a start-up without compiling.
        advice = "; on this CPU-only machine use --backend eager (the default)" + (
            ", or onnx engines (accel export --backend onnx) to load without compiling"
            if "onnx" in usable
            else ""
        )
        report.fixes.append(f"compile backends usable here: {', '.join(usable)}{advice} (docs/choosing.md)")
        return
    # aot first: on one H200 its engines reached the first image soonest at the same step speed as
    # inductor's (docs/benchmarks/startup/); tensorrt depends on a torch-tensorrt release for this torch.
    fast = [name for name in ("aot", "inductor", "tensorrt") if name in usable]
    report.fixes.append(
        f"compile backends usable here: {', '.join(usable)}"
        + (
            f"; for speed export engines once (accel export PLAN --backend {fast[0]}) and run with them "
            "(docs/choosing.md)"
            if fast
            else ""
        )
    )


def run_checks() -> Report:
    """Inspect the installation, devices, links and compile backends; never raises."""
    report = Report()
    _check_installation(report)
    n = _check_gpus(report)
    _check_links(report, n)
    _check_comm(report, n)
    _check_backends(report, n)
    _verdict(report)
    return report


def doctor(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Check versions, GPUs, NVLink/P2P, NCCL and which compile backends work here, with fixes.

    Exits 0 when accel can run (see the verdict), 1 when a required package is missing.
    """
    report = run_checks()
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        console = Console(soft_wrap=False)
        table = Table(title="accel doctor", show_lines=False)
        for column in ("", "check", "", "detail"):
            table.add_column(column, overflow="fold")
        group = ""
        for c in report.checks:
            mark = "[green]ok[/green]" if c.ok else "[yellow]--[/yellow]"
            table.add_row(c.group if c.group != group else "", escape(c.name), mark, escape(c.detail))
            group = c.group
        console.print(table)
        lines = [report.verdict, *(f"- {fix}" for fix in report.fixes)]
        console.print(Panel(escape("\n".join(lines)), title="verdict", expand=False))
    if not report.ready:
        raise typer.Exit(1)
