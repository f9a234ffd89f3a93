"""Where a model comes from: a diffusers folder, a hub id, a built-in tiny demo or a full-size architecture.

A plan file records its model source as a small JSON object (``{"kind": "demo", "name": "sdxl"}``);
:class:`ModelSource` is that object, typed. Loading the model it names lives in :mod:`accel.targets`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from accel.errors import AccelError

SourceKind = Literal["folder", "hub", "demo", "arch"]
SOURCE_KINDS: tuple[str, ...] = get_args(SourceKind)
Demo = Literal["sdxl", "sd3"]
DEMOS: tuple[str, ...] = get_args(Demo)
Arch = Literal["sdxl-base-1.0", "sd3-medium"]
ARCHS: tuple[str, ...] = get_args(Arch)
#: The JSON key that holds the location of each kind of source.
SOURCE_FIELDS = {"folder": "path", "hub": "id", "demo": "name", "arch": "name"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class SourceError(AccelError, ValueError):
    """A model source is invalid or missing; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelSource:
    """A model source (see the module docstring); make one with the constructors below.

    Attributes:
        kind: ``"folder"``, ``"hub"``, ``"demo"`` or ``"arch"``.
        location: the folder's absolute path, the hub id, or the demo's / architecture's name.
        seed: the random weights' seed of an ``"arch"`` source (``None`` for the others).
    """

    kind: SourceKind
    location: str
    seed: int | None = None

    @classmethod
    def demo(cls, name: str) -> ModelSource:
        """A built-in tiny pipeline (``accel --demo``)."""
        if name not in DEMOS:
            raise SourceError(f"--demo {name!r} is not one of {', '.join(DEMOS)}.")
        return cls("demo", name)

    @classmethod
    def arch(cls, name: str, seed: int = 0) -> ModelSource:
        """A full-size architecture with random weights (``accel plan --arch``)."""
        if name not in ARCHS:
            raise SourceError(f"--arch {name!r} is not one of {', '.join(ARCHS)}.")
        return cls("arch", name, seed)

    @classmethod
    def model(cls, model: str) -> ModelSource:
        """A diffusers pipeline folder (with ``model_index.json``) or, when no such folder exists, a hub id."""
        path = Path(model)
        if path.exists():
            if not (path / "model_index.json").is_file():
                raise SourceError(
                    f"{model} is not a diffusers pipeline folder (no model_index.json). Pass the folder that "
                    "DiffusionPipeline.from_pretrained() loads, or use --demo sdxl / --arch sdxl-base-1.0."
                )
            return cls("folder", str(path.resolve()))
        if _HUB_ID.match(model):
            return cls("hub", model)
        raise SourceError(
            f"{model}: no such folder. Pass a diffusers pipeline folder (with model_index.json) or a hub id "
            "such as stabilityai/stable-diffusion-xl-base-1.0, or use --demo sdxl."
        )

    @classmethod
    def choose(cls, model: str | None, demo: str | None, arch: str | None, seed: int = 0) -> ModelSource:
        """The source of a command line that gives exactly one of MODEL, ``--demo`` and ``--arch``."""
        if sum(x is not None for x in (model, demo, arch)) != 1:
            raise SourceError("give exactly one of MODEL (a diffusers folder or hub id), --demo or --arch.")
        if demo is not None:
            return cls.demo(demo)
        if arch is not None:
            return cls.arch(arch, seed)
        assert model is not None
        return cls.model(model)

    @classmethod
    def from_dict(cls, value: Any) -> ModelSource:
        """The source a plan file records (``{"kind": ..., "path"|"id"|"name": ..., "seed"?: ...}``)."""
        if not isinstance(value, Mapping) or value.get("kind") not in SOURCE_KINDS:
            raise SourceError(
                f"source={value!r} is invalid: expected a dict whose 'kind' is one of {', '.join(SOURCE_KINDS)}."
            )
        key = SOURCE_FIELDS[value["kind"]]
        if not isinstance(value.get(key), str):
            raise SourceError(f"source.{key}={value.get(key)!r} is invalid: expected a string.")
        seed = value.get("seed")
        return cls(value["kind"], value[key], None if seed is None else int(seed))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a plan file records (the inverse of :meth:`from_dict`)."""
        data: dict[str, Any] = {"kind": self.kind, SOURCE_FIELDS[self.kind]: self.location}
        if self.seed is not None:
            data["seed"] = self.seed
        return data

    @property
    def is_builtin(self) -> bool:
        """Whether accel builds the pipeline itself (a demo or an architecture), rather than loading files."""
        return self.kind in ("demo", "arch")

    @property
    def command_argument(self) -> str:
        """How ``accel plan`` / ``accel run`` name this source on the command line."""
        return f"--{self.kind} {self.location}" if self.is_builtin else self.location
