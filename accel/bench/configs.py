"""The speed suite's names: its configurations, baselines, window modes and B*'s compile modes.

A leaf without torch, so that ``accel bench --help`` takes its defaults and choices from here.
"""

from __future__ import annotations

#: Every configuration (:mod:`accel.bench.speed` describes each).
CONFIGS: tuple[str, ...] = ("A", "B", "B*", "S", "C", "D", "E")
#: What a run measures unless told otherwise (S wants engines exported from a one-device plan).
DEFAULT_CONFIGS: tuple[str, ...] = ("A", "B", "B*", "C", "D", "E")
#: The single-GPU baselines every configuration's speed-up is reported against.
BASELINES: tuple[str, ...] = ("A", "B", "B*")
WINDOW_MODES: tuple[str, ...] = ("reference", "cached", "off")
#: ``torch.compile`` modes B* may use on a GPU (the recipe's inductor settings apply to both).
EXPERT_MODES: tuple[str, ...] = ("max-autotune", "reduce-overhead")
DEFAULT_EXPERT_MODE = "max-autotune"
