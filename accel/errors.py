"""The base class of every error accel raises, so that one ``except accel.AccelError`` catches them all."""

from __future__ import annotations


class AccelError(Exception):
    """An error raised by accel. Each subclass also derives from the built-in error it refines
    (``ValueError`` for bad input, ``RuntimeError`` for a failure while running), so either clause catches it."""
