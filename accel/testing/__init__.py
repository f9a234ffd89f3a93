"""Offline test and benchmark pipelines: tiny random-weight SDXL/SD3 for CPU tests, full-size
random-weight architectures for GPU benchmarks, and in-memory tokenizers (no model hub needed)."""

from __future__ import annotations

from accel.testing.pipelines import build_pipeline, full_size_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline
from accel.testing.tokenizers import clip_tokenizer

__all__ = [
    "build_pipeline",
    "clip_tokenizer",
    "full_size_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sdxl_pipeline",
]
