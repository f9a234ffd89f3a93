"""The settings of one ``accel serve`` server, validated once when they are made."""

from __future__ import annotations

from dataclasses import dataclass, replace

from accel.errors import AccelError


class ServeSettingsError(AccelError, ValueError):
    """A server setting is invalid; the message names the option and what it accepts."""


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` (the OpenAI images API's order: width first) as ``(height, width)``."""
    width, sep, height = text.strip().lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise ValueError(f"{text!r} is not a size WIDTHxHEIGHT such as 1024x1024.")
    return int(height), int(width)


def format_size(size: tuple[int, int]) -> str:
    """``(height, width)`` as ``"WxH"``."""
    height, width = size
    return f"{width}x{height}"


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """How the server accepts, queues and batches requests.

    Attributes:
        host: the address the HTTP server listens on (rank 0 of node 0).
        port: its TCP port.
        model_name: the model id that ``/v1/models`` lists and requests may name.
        sizes: the ``(height, width)`` sizes served, each warmed up at start; empty: the model's default size.
        batch_sizes: the image counts a batch may have (a hybrid plan's batch buckets); ``None``: any count
            up to ``max_batch``.
        max_batch: images per pipeline call at most; also the most images one request may ask for.
        batch_wait_ms: how long the first request of a batch waits for others of the same shape.
        queue: requests that may wait at once; one more gets 429.
        default_steps: denoising steps of a request that does not say.
        max_steps: the most steps a request may ask for.
        default_guidance: guidance scale of a request that does not say.
        drain_timeout_s: after SIGTERM, how long queued and running requests may take to finish.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "accel"
    sizes: tuple[tuple[int, int], ...] = ()
    batch_sizes: tuple[int, ...] | None = None
    max_batch: int = 4
    batch_wait_ms: float = 10.0
    queue: int = 64
    default_steps: int = 20
    max_steps: int = 100
    default_guidance: float = 5.0
    drain_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue", "default_steps", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServeSettingsError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value!r}."
                )
        if not 1 <= self.port <= 65535:
            raise ServeSettingsError(f"--port {self.port} is not a TCP port (1-65535).")
        if self.default_steps > self.max_steps:
            raise ServeSettingsError(
                f"--steps {self.default_steps} is above --max-steps {self.max_steps}; lower one or raise the other."
            )
        if self.batch_wait_ms < 0:
            raise ServeSettingsError(f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms!r}.")
        if not 0 < self.drain_timeout_s <= 25:
            # The launcher stops workers 30 s after it forwards SIGTERM; draining must end before that.
            raise ServeSettingsError(
                f"--drain-timeout must be in (0, 25] seconds, got {self.drain_timeout_s!r}."
            )
        for height, width in self.sizes:
            if height < 8 or width < 8 or height % 8 or width % 8:
                raise ServeSettingsError(
                    f"--size {format_size((height, width))}: width and height must be multiples of 8 (at least 8)."
                )
        if self.batch_sizes is not None:
            usable = [b for b in self.batch_sizes if b <= self.max_batch]
            if not usable:
                raise ServeSettingsError(
                    f"--max-batch {self.max_batch} is below every batch size of the plan "
                    f"({', '.join(map(str, self.batch_sizes))}); raise --max-batch or make a plan with smaller batches."
                )

    @property
    def image_counts(self) -> tuple[int, ...]:
        """The image counts a batch (and so a request's ``n``) may have."""
        if self.batch_sizes is None:
            return tuple(range(1, self.max_batch + 1))
        return tuple(sorted(b for b in set(self.batch_sizes) if b <= self.max_batch))

    def with_sizes(self, sizes: tuple[tuple[int, int], ...]) -> ServeSettings:
        """These settings serving ``sizes`` (the model's default size, once it is known)."""
        return replace(self, sizes=sizes)
