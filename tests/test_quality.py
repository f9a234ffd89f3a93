"""The committed quality models: CFG split keeps the conditional accuracy, the default hybrid loses little.

Both trained digit pipelines run 50 steps on 10 digits x 5 seeds: unwrapped in this process (exact),
then on 2 real gloo processes with ``strategy="cfg"`` and with ``strategy="hybrid"`` at accel's default
schedule and window guidance.
"""

from __future__ import annotations

import pytest

from accel.bench.quality import QualityMode, run_quality
from accel.testing.quality.models import FAMILIES, classifier_record, load_quality_model

SEEDS = tuple(range(5))
STEPS = 50


def _modes(family: str) -> list[QualityMode]:
    return [QualityMode("exact", "exact"), QualityMode("cfg", "cfg"), QualityMode("hybrid", "hybrid")]


def test_committed_models_load_and_record_their_accuracy() -> None:
    assert classifier_record()["heldout_accuracy"] >= 0.95
    for family in FAMILIES:
        model = load_quality_model(family)  # checks the rebuilt text encoders against the fingerprint
        assert model.manifest["evaluation"]["exact_cfg_accuracy"] >= 0.9


@pytest.fixture(scope="module")
def report():
    return run_quality(FAMILIES, seeds=SEEDS, steps=STEPS, modes=_modes)


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_split_and_default_hybrid_keep_accuracy(report, family: str) -> None:
    result = report.family(family)
    exact, cfg, hybrid = (result.mode(name) for name in ("exact", "cfg", "hybrid"))
    assert exact.accuracy >= 0.9, f"{family}: exact CFG accuracy {exact.accuracy:.2f}"
    # CFG split is exact up to fp rounding: the same digit is read in every sample.
    assert cfg.predicted == exact.predicted and cfg.accuracy == exact.accuracy
    assert cfg.psnr_min_db >= 60.0, f"{family}: CFG split PSNR {cfg.psnr_min_db:.1f} dB"
    # The default schedule really pipelines some steps, and costs at most 2 points of accuracy.
    assert hybrid.window is not None and hybrid.pipelined_steps > 0
    assert hybrid.accuracy >= exact.accuracy - 0.02, (
        f"{family}: hybrid accuracy {hybrid.accuracy:.2f} vs exact {exact.accuracy:.2f}"
    )
    assert hybrid.psnr_mean_db >= 25.0, f"{family}: hybrid PSNR {hybrid.psnr_mean_db:.1f} dB"
