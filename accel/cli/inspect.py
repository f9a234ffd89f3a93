"""``accel inspect``: show what a plan file or an engine directory holds, and whether it is valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from accel.cli.common import plan_table


def _reexport(directory: str) -> str:
    """How to fix engines that are broken, missing or built elsewhere (:meth:`EngineStore.reexport_command`)."""
    from accel.compile.store import EngineStore

    return f"`{EngineStore(directory).reexport_command()}` (it rewrites only the broken or missing engines)"


def _environment() -> dict[str, Any]:
    """What an engine must have been built for to load here (device type, compute capability, versions)."""
    # Deferred here and below: torch, diffusers and accel.compile load slowly, and `accel --help` imports this.
    import diffusers
    import torch

    capability = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        capability = f"sm_{major}{minor}"
    return {
        "device_type": "cuda" if capability else "cpu",
        "compute_capability": capability,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }


def _backend_version(name: str) -> str | None:
    from accel.compile.backends import get_backend

    try:
        return get_backend(name).version()
    except Exception:  # not installed here: the engine cannot load, and the note says so
        return None


def model_weights(source: Any, records: dict[str, Any]) -> dict[str, str]:
    """The weights fingerprint each engine (by key) would see with the model ``source``
    (an :class:`accel.source.ModelSource`), computed as ``accel export`` does: the denoiser in the
    dtype its engines were built for, the VAE decoder in the dtype of its engine."""
    import copy

    import torch

    from accel.compile.stage import DecoderStage
    from accel.plan import weights_fingerprint
    from accel.settings import PRECISIONS
    from accel.targets import load_components

    dtypes = {key: _engine_dtype(record) for key, record in records.items()}
    first = next((d for k, d in dtypes.items() if not k.startswith(DECODER_PREFIX)), None)
    model, _, vae = load_components(source, dtype=first or PRECISIONS["fp32"], device="cpu", vae=True)
    found: dict[str, str] = {}
    seen: dict[tuple[bool, torch.dtype | None], str] = {}
    for key, dtype in dtypes.items():
        decoder = key.startswith(DECODER_PREFIX)
        if (decoder, dtype) not in seen:
            if decoder:
                if vae is None:
                    continue
                target: torch.nn.Module = DecoderStage(copy.deepcopy(vae.decoder).to(dtype))
            else:
                target = model if dtype in (None, first) else copy.deepcopy(model).to(dtype)
            seen[(decoder, dtype)] = weights_fingerprint(target)
        found[key] = seen[(decoder, dtype)]
    return found


#: Engine keys of the VAE decoder (:func:`accel.compile.engines.decoder_key`).
DECODER_PREFIX = "vae.decoder."


def _engine_dtype(record: Any) -> Any:
    """The floating dtype of an engine's inputs (what its stage's weights were cast to)."""
    import torch

    for spec in record.inputs:
        dtype = getattr(torch, str(spec.get("dtype")), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    return None


def _weights_entry(record: Any, current: str | None) -> dict[str, Any]:
    """How an engine holds its weights, and whether it serves a model whose fingerprint is ``current``."""
    from accel.compile.store import binds_weights

    held = "bound at load" if binds_weights(record) else "baked in"
    entry: dict[str, Any] = {
        "weights": held,
        "weights_fingerprint": record.weights_fingerprint,
        "graph_fingerprint": record.graph_fingerprint,
    }
    if current is not None:
        entry["model_weights_fingerprint"] = current
        entry["same_weights"] = current == record.weights_fingerprint
    return entry


def inspect_engines(directory: Path, weights: dict[str, str] | None = None) -> dict[str, Any]:
    """Every manifest entry of an engine directory with its file's integrity and fit for this machine.

    ``valid`` is False when the manifest is unreadable, an entry was edited after export (its digest),
    any file is missing, truncated or edited (sha256), or an interrupted export left stages out
    (``missing``). ``notes`` list what would make ``accel run`` refuse an entry here (versions, GPU, and,
    given a model's ``weights`` fingerprints by key (:func:`model_weights`), other weights baked into the
    engine). Each entry says how it holds weights (``"bound at load"``: a fine-tune of the same graph
    reuses it; ``"baked in"``) and which weights it was built with.
    """
    from accel.compile.store import (
        BUILD_S,
        LOCK,
        MANIFEST,
        TUNING_NOTE,
        EngineError,
        EngineRecord,
        EngineStore,
        sha256_file,
    )

    store = EngineStore(directory)
    try:
        manifest = store.read_manifest()
    except EngineError as exc:
        return {
            "kind": "engines",
            "directory": str(directory),
            "valid": False,
            "error": str(exc),
            "engines": [],
        }
    here = _environment()
    entries: list[dict[str, Any]] = []
    for key, data in sorted(manifest["engines"].items()):
        try:
            record = EngineRecord.from_dict({"key": key, **data})
        except (EngineError, TypeError) as exc:
            entries.append({"key": key, "problems": [str(exc)], "notes": []})
            continue
        held = _weights_entry(record, (weights or {}).get(key))
        notes = _fit_notes(record, here)
        if held.get("same_weights") is False and held["weights"] == "baked in":
            notes.append(f"built for other weights; a {record.backend} engine holds its own copy of them")
        entries.append(
            {
                "key": key,
                "file": record.file,
                "backend": record.backend,
                "tuning": _tuning_entry(record),
                "tuning_note": record.extra.get(TUNING_NOTE),
                "build_s": record.extra.get(BUILD_S),
                "size": record.size,
                "device_type": record.device_type,
                "compute_capability": record.compute_capability,
                "versions": record.versions,
                "inputs": record.inputs,
                "created": record.created,
                **held,
                "problems": _file_problems(directory, record, sha256_file),
                "notes": notes,
            }
        )
    for entry in entries:
        if "file" in entry:
            entry["problems"] = store.entry_problems(entry["key"]) + entry["problems"]
    missing = store.missing()
    listed = {e.get("file") for e in entries}
    stray = sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and p.name not in listed and p.name not in (MANIFEST, LOCK)
    )
    return {
        "kind": "engines",
        "directory": str(directory),
        "format": manifest.get("format"),
        "valid": not missing and all(not e["problems"] for e in entries),
        "engines": entries,
        "missing": missing,
        "unlisted_files": stray,
    }


def _file_problems(directory: Path, record: Any, sha256_file: Any) -> list[str]:
    if Path(record.file).name != record.file:
        return [f"names a file outside the directory ({record.file!r})"]
    path = directory / record.file
    if not path.is_file():
        return ["file missing"]
    size = path.stat().st_size
    if size < record.size:
        return [f"truncated ({size} of {record.size} bytes)"]
    if size != record.size or sha256_file(path) != record.sha256:
        return ["edited after export (sha256 mismatch)"]
    return []


def _fit_notes(record: Any, here: dict[str, Any]) -> list[str]:
    notes = []
    if record.device_type != here["device_type"]:
        notes.append(f"built for {record.device_type}, this machine runs {here['device_type']}")
    elif record.compute_capability != here["compute_capability"]:
        notes.append(f"built for {record.compute_capability}, this GPU is {here['compute_capability']}")
    current = {**here["versions"], record.backend: _backend_version(record.backend)}
    for lib, built in record.versions.items():
        if lib in current and current[lib] != built:
            notes.append(f"built with {lib} {built}, this is {current[lib] or 'not installed'}")
    return notes


def _weights_cell(entry: dict[str, Any]) -> str:
    """``<fingerprint> (bound at load)``, and against a given model: same / other, served or refused."""
    if "weights" not in entry:
        return ""
    cell = f"{entry['weights_fingerprint']} ({entry['weights']})"
    same = entry.get("same_weights")
    if same is True:
        cell += ", same as the model"
    elif same is False:
        served = "served without recompiling" if entry["weights"] == "bound at load" else "refused"
        cell += f", the model's are {entry['model_weights_fingerprint']}: {served}"
    return escape(cell)


def _tuning_entry(record: Any) -> dict[str, bool] | None:
    """The tuning a tunable backend's engine was built with (``None`` for the other backends)."""
    from accel.compile.backends import get_backend
    from accel.compile.store import record_tuning

    try:
        tunable = get_backend(record.backend).tunable
    except ValueError:  # an unknown backend is reported by the fit notes
        return None
    return record_tuning(record).to_dict() if tunable else None


def _tuning_cell(entry: dict[str, Any]) -> str:
    from accel.compile.store import describe_tuning
    from accel.settings import Tuning

    tuning = entry.get("tuning")
    return "-" if tuning is None else describe_tuning(Tuning.from_dict(tuning), entry.get("tuning_note"))


def _print_engines(console: Console, info: dict[str, Any]) -> None:
    table = Table(title=f"engines in {info['directory']} (manifest format {info.get('format')})")
    for column in (
        "key",
        "backend",
        "tuning",
        "built in",
        "MB",
        "device",
        "weights",
        "integrity",
        "fits here",
    ):
        table.add_column(column, overflow="fold")
    for e in info["engines"]:
        device = e.get("compute_capability") or e.get("device_type") or ""
        state = "[green]ok[/green]" if not e["problems"] else f"[red]{escape('; '.join(e['problems']))}[/red]"
        fits = "yes" if not e["notes"] else escape("; ".join(e["notes"]))
        table.add_row(
            escape(e["key"]),
            e.get("backend", ""),
            _tuning_cell(e),
            "-" if e.get("build_s") is None else f"{e['build_s']:.0f} s",
            f"{e.get('size', 0) / 1e6:.1f}",
            device,
            _weights_cell(e),
            state,
            fits,
        )
    console.print(table)
    for name in info.get("unlisted_files", []):
        console.print(
            f"not in the manifest: {escape(name)} (left by an interrupted export?)", highlight=False
        )
    missing = info.get("missing", [])
    if missing:
        expected = len(missing) + len(info["engines"])
        console.print(
            f"[red]incomplete:[/red] {len(missing)} of {expected} engine(s) missing: {escape(', '.join(missing))} "
            "(an interrupted export?)",
            highlight=False,
        )
    if info["valid"]:
        console.print(f"manifest valid: {len(info['engines'])} engine(s), every checksum matches.")
    if any(e["notes"] for e in info["engines"]):
        console.print(
            "entries that do not fit here are refused by `accel run`; re-export them on this machine with "
            f"{escape(_reexport(info['directory']))}.",
            highlight=False,
        )


def inspect(
    path: Path = typer.Argument(
        ..., help="A plan file (`accel plan`) or an engine directory (`accel export`).", show_default=False
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the plan or the engine report as JSON."),
    model: str = typer.Option(
        None,
        "--model",
        help="Compare an engine directory's weights with this model's (a diffusers folder or hub id).",
    ),
    demo: str = typer.Option(None, "--demo", help="Compare an engine directory's weights with a demo's."),
) -> None:
    """Show a plan's stages, costs and boundary tensors, or an engine directory's entries and checksums.

    For engines: how each holds its weights ("bound at load": a fine-tune or fused LoRA of the same
    architecture reuses it without recompiling; "baked in": only the weights it was built with) and
    their fingerprint; with --model or --demo, whether that model's weights are the engines' own.
    Exits 1 when the plan fails validation, or when the engine manifest is unreadable or a file is
    missing, truncated or edited.
    """
    from accel.compile.store import MANIFEST
    from accel.plan import PlanError, load_plan

    console = Console(soft_wrap=True)
    errors = Console(stderr=True, soft_wrap=True)
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            errors.print(
                f"[red]invalid:[/red] {escape(str(path))} is not an engine directory (no {MANIFEST}); "
                "`accel export PLAN -o DIR` writes one.",
                highlight=False,
            )
            raise typer.Exit(1)
        info = inspect_engines(path, _weights_of(errors, path, model, demo))
        if as_json:
            typer.echo(json.dumps(info, indent=2))
        elif "error" in info:
            errors.print(f"[red]invalid:[/red] {escape(info['error'])}", highlight=False)
        else:
            _print_engines(console, info)
            if not info["valid"]:
                errors.print(
                    "[red]invalid:[/red] some engines are missing or do not match the manifest; re-export "
                    f"them with {escape(_reexport(info['directory']))}.",
                    highlight=False,
                )
        if not info["valid"]:
            raise typer.Exit(1)
        return
    try:
        plan = load_plan(path)
    except (PlanError, OSError) as exc:
        errors.print(f"[red]invalid:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(plan.to_dict(), indent=2))
        return
    console.print(plan_table(plan))
    console.print(
        f"source: {plan.source}; strategy {plan.strategy}, backend {plan.backend}; made by accel "
        f"{plan.accel_version} on {plan.created}",
        markup=False,
        highlight=False,
    )
    for edge in plan.boundary:
        console.print(
            f"  {edge.name}: unit {edge.producer} -> {edge.consumer}, {list(edge.shape)} {edge.dtype}, "
            f"{edge.nbytes / 2**20:.2f} MiB",
            markup=False,
            highlight=False,
        )


def _weights_of(
    errors: Console, directory: Path, model: str | None, demo: str | None
) -> dict[str, str] | None:
    """The weights fingerprints of ``--model``/``--demo`` for the engines of ``directory`` (None: neither)."""
    if model is None and demo is None:
        return None
    from accel.compile.store import EngineError, EngineStore
    from accel.errors import AccelError
    from accel.source import ModelSource

    try:
        source = ModelSource.choose(model, demo, None)
        return model_weights(source, EngineStore(directory).records())
    except (AccelError, EngineError, OSError) as exc:
        errors.print(f"[red]invalid:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from exc
