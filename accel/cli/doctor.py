"""``accel doctor``: what this machine can run, and what to fix."""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import asdict, dataclass

import typer
from rich.console import Console
from rich.table import Table

from accel.cli.app import app


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_checks() -> list[Check]:
    """Inspect the installation and the devices; never raises."""
    import torch

    checks = [Check("torch", True, torch.__version__)]
    for package in ("diffusers", "transformers", "lightning"):
        version = _version(package)
        checks.append(
            Check(
                package,
                version is not None,
                version or "not installed",
                "" if version else f"pip install {package}",
            )
        )
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        checks.append(
            Check(
                "CUDA GPUs",
                False,
                f"none visible (torch built with CUDA {torch.version.cuda})",
                "accel runs on CPU processes (gloo) with accelerator='cpu'; install a CUDA build of torch for GPUs",
            )
        )
    else:
        for i in range(n):
            major, minor = torch.cuda.get_device_capability(i)
            memory = torch.cuda.get_device_properties(i).total_memory / 2**30
            checks.append(
                Check(
                    f"GPU {i}", True, f"{torch.cuda.get_device_name(i)}, sm_{major}{minor}, {memory:.0f} GiB"
                )
            )
        if n > 1:
            pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
            missing = [f"{a}->{b}" for a, b in pairs if not torch.cuda.can_device_access_peer(a, b)]
            checks.append(
                Check(
                    "peer-to-peer",
                    not missing,
                    "all GPU pairs" if not missing else f"no P2P for {', '.join(missing)}",
                    "" if not missing else "NCCL falls back to host memory: expect slower pipelined windows",
                )
            )
        nccl = (
            ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None
        )
        checks.append(
            Check("NCCL", nccl is not None, nccl or "not available", "" if nccl else "install a CUDA torch")
        )
    checks.append(
        Check(
            "gloo",
            torch.distributed.is_gloo_available(),
            "available" if torch.distributed.is_gloo_available() else "missing",
            "",
        )
    )
    return checks


@app.command("doctor")
def doctor(as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON.")) -> None:
    """Check versions, GPUs, peer-to-peer access and communication backends."""
    checks = run_checks()
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in checks], indent=2))
        return
    table = Table(title="accel doctor")
    for column in ("check", "", "detail", "fix"):
        table.add_column(column)
    for c in checks:
        table.add_row(c.name, "[green]ok[/green]" if c.ok else "[yellow]--[/yellow]", c.detail, c.fix)
    console = Console()
    console.print(table)
    problems = [c for c in checks if not c.ok]
    console.print("verdict: " + ("ready" if not problems else f"{len(problems)} item(s) to look at"))
