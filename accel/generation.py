"""What ``accel run`` does inside each worker process: load, wrap, generate in batches, save (rank 0)."""

from __future__ import annotations

import inspect
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from accel.accelerator import Accelerator
from accel.atomic import atomic_path
from accel.images import call_arguments
from accel.launch import launched_environment
from accel.png import encode_png
from accel.request import IMAGE_SUFFIXES
from accel.settings import AccelSettings
from accel.source import ModelSource
from accel.targets import load_pipeline
from accel.wrapper import unwrap

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class GenerationJob:
    """Everything a worker needs (picklable: it travels to spawned processes).

    ``source`` names the model, ``settings`` are the keyword arguments of :class:`accel.AccelSettings`. Image ``i`` (counted over all
    prompts) is generated from seed ``seed + i``, so an image does not depend on how prompts are batched.
    """

    source: ModelSource
    settings: dict[str, Any]
    prompts: list[str]
    negative_prompt: str | None = None
    batch_size: int = 4
    steps: int = 20
    guidance: float = 5.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    output: str = "accel-out.png"
    warmup: int = 0
    progress: bool = True
    log_level: str = "WARNING"

    def batches(self) -> Iterator[tuple[int, list[str]]]:
        """``(index of the first prompt, prompts)`` for each pipeline call."""
        for start in range(0, len(self.prompts), self.batch_size):
            yield start, self.prompts[start : start + self.batch_size]


def output_paths(output: str | os.PathLike[str], count: int) -> list[Path]:
    """Where the ``count`` images go: ``out.png``; ``out-0.png, out-1.png, ...``; or ``DIR/0000.png, ...``."""
    out = Path(output)
    if out.suffix.lower() not in IMAGE_SUFFIXES:  # a folder
        return [out / f"{i:04d}.png" for i in range(count)]
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def _save(image: Any, path: Path) -> None:
    # Written beside the target and renamed: an interrupted run never leaves a partial image behind.
    with atomic_path(path, suffix=path.suffix) as tmp:
        if path.suffix.lower() == ".png":
            Path(tmp).write_bytes(encode_png(image))  # several times faster than PIL's writer, lossless
        else:
            image.save(tmp)


@contextmanager
def _step_progress(enabled: bool, total_images: int, steps: int) -> Iterator[Callable[[int], Any] | None]:
    """A rich progress bar on stderr (images, and steps of the current call); yields a per-call factory of
    ``callback_on_step_end`` functions, or ``None`` when disabled."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        images = progress.add_task("images", total=total_images)
        step_task = progress.add_task("steps", total=steps)

        def for_call(batch: int) -> Callable[..., dict[str, Any]]:
            progress.reset(step_task, total=steps)

            def on_step_end(_pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                progress.update(step_task, completed=step + 1)
                if step + 1 == steps:
                    progress.advance(images, batch)
                return kwargs

            return on_step_end

        yield for_call


def generate(job: GenerationJob) -> dict[str, Any]:
    """The worker: join the process group, generate every batch, save the images on rank 0.

    Returns ``{"rank", "images", "calls", "seconds", "startup"}``; ``images`` is empty on ranks other than
    0. Every rank computes every image (the pipeline's output is complete on each rank); only rank 0 writes.
    ``startup`` holds wall-clock times (``time.time()``) of the worker's start-up milestones: ``worker``
    (this function entered), ``loaded`` (pipeline loaded), ``wrapped``, ``first_call`` (the first pipeline
    call returned) and ``first_saved`` (its images written), so a caller can split its own start-up time.
    """
    startup = {"worker": time.time()}
    return run_in_group(job.settings, job.log_level, lambda acc: _generate(acc, job, startup))


def run_in_group(settings: dict[str, Any], log_level: str, work: Callable[[Accelerator], T]) -> T:
    """In a launched worker process: join the group with ``settings`` (:class:`AccelSettings` keyword
    arguments), return ``work(accelerator)`` and leave the group; a failure is posted to the other ranks
    first."""
    if launched_environment() is not None:
        # Ctrl-C reaches every process of the terminal; the launcher stops the workers (SIGTERM), so a
        # launched worker ignores SIGINT rather than print its own KeyboardInterrupt traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    import lightning  # noqa: F401  (its import sets its loggers to INFO; quieted below, after it)

    # A fresh process: its log format is this worker's to choose, with the rank on every line.
    rank = os.environ.get("RANK", "0")  # unset when this process is the only one
    logging.basicConfig(level=log_level, format=f"%(asctime)s rank {rank} %(name)s: %(message)s")
    # Fabric announces every process group at INFO; the run's own summary says what matters.
    for name in ("lightning.fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    acc = Accelerator(settings=AccelSettings(**settings))
    acc.launch()
    try:
        result = work(acc)
    except BaseException as exc:
        acc.report_failure(exc)  # peers on other nodes stop now instead of at the collective timeout
        raise
    acc.teardown()
    return result


def load_wrapped(acc: Accelerator, source: ModelSource) -> tuple[Any, Any]:
    """The pipeline ``source`` names, loaded for ``acc``'s precision and device, and its wrapper."""
    pipe = load_for(acc, source)
    return pipe, acc.wrap(pipe)


def load_for(acc: Accelerator, source: ModelSource) -> Any:
    """The pipeline ``source`` names, loaded for ``acc``'s precision and device (not wrapped)."""
    device = acc.device
    dtype = acc.settings.dtype
    if dtype is None and source.kind == "arch":
        # Full-size random-weight models: fp16 on GPUs, as `accel plan --arch` profiles them.
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(source, dtype=dtype, device=device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # accel's own bar replaces diffusers' per-rank bars
    return pipe


def _generate(acc: Accelerator, job: GenerationJob, startup: dict[str, float]) -> dict[str, Any]:
    pipe = load_for(acc, job.source)
    startup["loaded"] = time.time()
    wrapped = acc.wrap(pipe)
    startup["wrapped"] = time.time()
    takes_callback = "callback_on_step_end" in inspect.signature(type(pipe).__call__).parameters
    paths = output_paths(job.output, len(job.prompts))
    written: list[str] = []
    calls: list[dict[str, Any]] = []
    started = time.perf_counter()
    show = job.progress and acc.rank == 0 and takes_callback
    try:
        with _step_progress(show, len(job.prompts), job.steps) as progress:
            for start, prompts in job.batches():
                call = _call_arguments(job, start, prompts)
                for _ in range(job.warmup if start == 0 else 0):
                    wrapped(**call)
                if progress is not None:
                    call["callback_on_step_end"] = progress(len(prompts))
                images = wrapped(**call).images
                startup.setdefault("first_call", time.time())
                calls.append({**asdict(wrapped.last_report), "images": len(prompts)})
                if acc.rank == 0:
                    for offset, image in enumerate(images):
                        path = paths[start + offset]
                        _save(image, path)
                        written.append(str(path))
                startup.setdefault("first_saved", time.time())
    finally:
        unwrap(wrapped)
    return {
        "rank": acc.rank,
        "images": written,
        "calls": calls,
        "seconds": time.perf_counter() - started,
        "startup": startup,
    }


def _call_arguments(job: GenerationJob, start: int, prompts: list[str]) -> dict[str, Any]:
    return call_arguments(
        prompts,
        # Image i (over all prompts) uses seed + i: it looks the same whatever the batch size.
        [job.seed + start + i for i in range(len(prompts))],
        steps=job.steps,
        guidance=job.guidance,
        negative_prompts=[job.negative_prompt] * len(prompts) if job.negative_prompt else None,
        height=job.height,
        width=job.width,
    )
