"""Silencing third-party messages a user cannot act on, for the command line (``-v`` keeps them).

transformers warns on every start that torchvision is missing (its PIL image processors are used
instead), diffusers that a model has "modules that should be kept in float32: []", and torch's pytree
module that ``isinstance(treespec, LeafSpec)`` is deprecated (called from inside diffusers and torch).
None of it concerns an accel user. The settings are made through the environment as well, so that worker
processes started later inherit them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

#: Environment variables that set transformers' and diffusers' log levels when they are imported.
LIBRARY_LEVELS = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
#: Starts of FutureWarning messages torch's pytree module gives for calls inside torch and diffusers.
TREESPEC_WARNINGS = ("`isinstance(treespec", "`treespec.")


def quiet_third_party() -> None:
    """Silence the messages above in this process and in the processes it starts from now on."""
    for name, level in LIBRARY_LEVELS.items():
        os.environ.setdefault(name, level)
    for library in ("transformers", "diffusers"):
        if library in sys.modules:  # imported already: its level was read from the environment then
            logging.getLogger(library).setLevel(logging.ERROR)
    for start in TREESPEC_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=FutureWarning)
    # The user's own PYTHONWARNINGS come last, so that they take precedence in the workers.
    filters = [f"ignore:{start}:FutureWarning" for start in TREESPEC_WARNINGS]
    given = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join([*filters, given] if given else filters)
