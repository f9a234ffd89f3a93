"""Trained quality models: SDXL- and SD3-family digit pipelines and a digit classifier, trained on
scikit-learn's handwritten digits, to measure what accel's approximate modes change in generated images.

>>> model = load_quality_model("sd3")
>>> out = generate(model.pipe, SampleSet(seeds=(0, 1)), model.call_kwargs)
>>> conditional_accuracy(classify(load_classifier(), out.images), SampleSet(seeds=(0, 1)).labels)
"""

from __future__ import annotations

from accel.testing.quality.data import DIGITS, IMAGE_SIZE, digit_prompt
from accel.testing.quality.models import (
    FAMILIES,
    DigitClassifier,
    QualityModel,
    QualityModelError,
    load_classifier,
    load_quality_model,
)
from accel.testing.quality.sampling import (
    Generated,
    SampleSet,
    classify,
    conditional_accuracy,
    generate,
    requested_probability,
)

__all__ = [
    "DIGITS",
    "FAMILIES",
    "IMAGE_SIZE",
    "DigitClassifier",
    "Generated",
    "QualityModel",
    "QualityModelError",
    "SampleSet",
    "classify",
    "conditional_accuracy",
    "digit_prompt",
    "generate",
    "load_classifier",
    "load_quality_model",
    "requested_probability",
]
