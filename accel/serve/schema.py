"""Image requests: parsed and validated before they are queued, so bad input never reaches the workers.

The body follows the OpenAI images API (``prompt``, ``n``, ``size`` as ``"WxH"``, ``response_format``,
``output_format`` and ``output_compression``, ``model``) and accepts diffusers' own fields too (``negative_prompt``, ``num_inference_steps``,
``guidance_scale``, ``seed``). A problem is a :class:`ApiError` whose JSON form is the OpenAI error
object, naming the field and the values it accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from accel.errors import AccelError
from accel.serve.settings import ServeSettings, format_size, parse_size

#: Fields of the OpenAI images API that are accepted but do not change the image.
IGNORED_FIELDS = ("user",)
FIELDS = (
    "prompt",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "model",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    *IGNORED_FIELDS,
)
RESPONSE_FORMATS = ("b64_json",)
#: Image file formats, as the OpenAI images API names them; ``output_compression`` is the quality of the
#: lossy ones.
OUTPUT_FORMATS = ("png", "jpeg", "webp")
LOSSY_FORMATS = ("jpeg", "webp")
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 50.0


class ApiError(AccelError, ValueError):
    """A request the server refuses; ``status`` is its HTTP status, ``param`` the field at fault."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.kind = kind

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class ImageRequest:
    """One validated request for ``n`` images; image ``i`` is generated from ``seed + i``."""

    prompt: str
    n: int
    height: int
    width: int
    steps: int
    guidance: float
    negative_prompt: str | None
    seed: int | None
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int = 100

    @property
    def shape(self) -> tuple[int, int, int, float, bool]:
        """What requests must share to run in one pipeline call."""
        return (self.height, self.width, self.steps, self.guidance, self.negative_prompt is not None)


def _integer(body: dict[str, Any], name: str, default: int, low: int, high: int, valid: str) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(f"{name}={value!r} is invalid: {valid}.", param=name)
    return value


def _text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(f"{name} must be a string, got {type(value).__name__}.", param=name)
    return value


def parse_request(body: Any, settings: ServeSettings) -> ImageRequest:
    """The validated request of a decoded JSON ``body``; :class:`ApiError` names what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(
            f'the request body must be a JSON object such as {{"prompt": "a cat"}}, got {type(body).__name__}.'
        )
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ApiError(
            f"unknown field(s) {', '.join(unknown)}; accepted fields: {', '.join(FIELDS)}.", param=unknown[0]
        )
    prompt = _text(body, "prompt")
    if prompt is None or not prompt.strip():
        raise ApiError("prompt is required and must not be empty.", param="prompt")
    counts = settings.image_counts
    n = _integer(body, "n", 1, 1, max(counts), f"one of {', '.join(map(str, counts))}")
    if n not in counts:
        raise ApiError(f"n={n} is invalid: one of {', '.join(map(str, counts))}.", param="n")
    sizes = ", ".join(format_size(s) for s in settings.sizes)
    size_text = body.get("size")
    if size_text is None:
        height, width = settings.sizes[0]
    else:
        try:
            height, width = parse_size(size_text) if isinstance(size_text, str) else (0, 0)
        except ValueError:
            height, width = (0, 0)
        if (height, width) not in settings.sizes:
            raise ApiError(f"size={size_text!r} is not served; valid values: {sizes}.", param="size")
    response_format = body.get("response_format") or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(
            f"response_format={response_format!r} is not supported; valid values: {', '.join(RESPONSE_FORMATS)}.",
            param="response_format",
        )
    output_format = body.get("output_format") or "png"
    if output_format not in OUTPUT_FORMATS:
        raise ApiError(
            f"output_format={output_format!r} is not supported; valid values: {', '.join(OUTPUT_FORMATS)}.",
            param="output_format",
        )
    if body.get("output_compression") is not None and output_format not in LOSSY_FORMATS:
        raise ApiError(
            f"output_compression applies to output_format {' or '.join(LOSSY_FORMATS)}, not {output_format} "
            "(lossless).",
            param="output_compression",
        )
    compression = _integer(body, "output_compression", 100, 0, 100, "an integer 0-100")
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise ApiError(
            f"model={model!r} is not served here; valid values: {settings.model_name}.",
            status=404,
            param="model",
            kind="model_not_found",
        )
    steps = _integer(
        body,
        "num_inference_steps",
        settings.default_steps,
        1,
        settings.max_steps,
        f"an integer 1-{settings.max_steps}",
    )
    guidance = body.get("guidance_scale")
    if guidance is None:
        guidance = settings.default_guidance
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, (int, float))
        or not math.isfinite(guidance)
        or not 0 <= guidance <= MAX_GUIDANCE
    ):
        raise ApiError(
            f"guidance_scale={guidance!r} is invalid: a number 0-{MAX_GUIDANCE:g}.", param="guidance_scale"
        )
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(body, "seed", 0, 0, MAX_SEED - (n - 1), f"an integer 0-{MAX_SEED - (n - 1)}")
    return ImageRequest(
        prompt=prompt,
        n=n,
        height=height,
        width=width,
        steps=steps,
        guidance=float(guidance),
        negative_prompt=_text(body, "negative_prompt"),
        seed=seed,
        response_format=response_format,
        output_format=output_format,
        output_compression=compression,
    )
