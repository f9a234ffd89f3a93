"""``accel serve``: one long-lived worker group behind an HTTP server on rank 0.

The pieces, from the HTTP request down to the ranks:

- :mod:`accel.serve.settings`: the server's validated settings; :mod:`accel.serve.job`: what to serve,
  checked before any process starts.
- :mod:`accel.serve.schema`: request parsing and validation (OpenAI images API plus diffusers' fields).
- :mod:`accel.serve.scheduler`: the bounded FIFO queue and the batcher.
- :mod:`accel.serve.channel`: how rank 0 hands each batch to the other ranks (the group's store).
- :mod:`accel.serve.metrics`: Prometheus metrics.
- :mod:`accel.serve.app`: the FastAPI application and the page at ``/``.
- :mod:`accel.serve.worker`: what each rank runs, and starting the group;
  :mod:`accel.serve.watch`: rank 0 watching the worker processes of its host.

FastAPI, uvicorn and prometheus-client are the optional extra ``accel[serve]``; :func:`require_extra`
says how to install them when they are missing.
"""

from __future__ import annotations

import importlib.util

from accel.errors import AccelError

#: The modules of the ``accel[serve]`` extra (import name -> distribution name).
EXTRA_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}


class MissingExtraError(AccelError, RuntimeError):
    """The ``accel[serve]`` extra is not installed; the message names the install command."""


def require_extra() -> None:
    """Raise :class:`MissingExtraError` unless FastAPI, uvicorn and prometheus-client can be imported."""
    missing = [dist for module, dist in EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtraError(
            f"accel serve needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            "pip install 'accel[serve]'."
        )
