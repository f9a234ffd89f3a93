"""The base class of every error accel raises, so that one ``except accel.AccelError`` catches them all."""

from __future__ import annotations


class AccelError(Exception):
    """An error raised by accel. Each subclass also derives from the built-in error it refines
    (``ValueError`` for bad input, ``RuntimeError`` for a failure while running), so either clause catches it."""


class Interrupted(BaseException):
    """The process was asked to stop (SIGINT, SIGTERM, ...): not an error, so ``except Exception`` lets it
    through, like ``KeyboardInterrupt``. ``signum`` is the signal; a command exits with ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
