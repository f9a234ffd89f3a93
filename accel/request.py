"""What a user asks ``accel run`` to generate, as given, and the checks that need nothing but the input.

Nothing heavy is imported here: the command line reads these defaults to write its help.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from accel.atomic import unwritable_reason
from accel.errors import AccelError
from accel.settings import SCHEDULE_MODES

DEFAULT_PROMPT = "a photo of an astronaut riding a horse"
#: Where images go without ``--output``.
DEFAULT_OUTPUT = Path("accel-out.png")
#: Image file suffixes ``--output`` may end in (PIL writes each by its suffix).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: ``--schedule`` values besides a window ``START-END``.
SCHEDULE_NAMES: tuple[str, ...] = tuple(mode for mode in SCHEDULE_MODES if mode != "window")


class RequestError(AccelError, ValueError):
    """The run cannot start as asked; the message says what to change."""


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate and how, as given (``None``: the plan's or the default)."""

    prompts: list[str] | None = None
    prompts_file: Path | None = None
    negative_prompt: str | None = None
    batch_size: int | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    precision: str | None = None
    strategy: str | None = None
    window_guidance: str | None = None
    schedule: str | None = None
    backend: str | None = None
    engines: Path | None = None
    strict: bool | None = None
    compile_missing: bool | None = None
    warmup: int | None = None
    output: Path | None = None

    def given(self) -> list[str]:
        """The options given, as ``--option`` names (a script target refuses them)."""
        values = dataclasses.asdict(self)
        return sorted(f"--{name.replace('_', '-')}" for name, value in values.items() if value is not None)


def check_output(output: Path) -> None:
    """Refuse an output that is not an image file or folder, or that cannot be written."""
    suffix = output.suffix.lower()
    if suffix and suffix not in IMAGE_SUFFIXES:
        raise RequestError(
            f"--output {output}: images are written as {', '.join(IMAGE_SUFFIXES)}; name a file with one of "
            "those suffixes, or a folder (no suffix)."
        )
    if not suffix and output.exists() and not output.is_dir():
        raise RequestError(f"--output {output} is a file; name a folder or an image file.")
    # The nearest existing folder must be writable, or the run would fail after generating everything.
    reason = unwritable_reason(output)
    if reason is not None:
        raise RequestError(f"--output {output}: {reason}.")


def read_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[str]:
    """The prompts given, one per line of ``prompts_file``, or the default prompt."""
    if prompts_file is not None:
        if prompts is not None:
            raise RequestError("give prompts with --prompt or with --prompts-file, not both.")
        if not prompts_file.is_file():
            raise RequestError(f"--prompts-file {prompts_file}: no such file.")
        lines = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines()]
        found = [line for line in lines if line]
        if not found:
            raise RequestError(f"--prompts-file {prompts_file} holds no prompts (one per line).")
        return found
    return list(prompts) if prompts else [DEFAULT_PROMPT]


def parse_schedule(schedule: str | None) -> str | tuple[int, int] | None:
    """A ``--schedule`` value: a mode name, or ``START-END`` as a ``(start, end)`` window."""
    if schedule is None or schedule in SCHEDULE_NAMES:
        return schedule
    start, sep, end = schedule.partition("-")
    if sep and start.isdigit() and end.isdigit():
        return (int(start), int(end))
    raise RequestError(
        f"--schedule {schedule!r}: use {', '.join(SCHEDULE_NAMES)}, or a window START-END "
        "of 0-based steps (5-20)."
    )
