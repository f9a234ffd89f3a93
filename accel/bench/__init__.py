"""Measurement suites behind ``accel bench``: :mod:`accel.bench.quality` (trained digit models, what each
accelerated mode changes) and :mod:`accel.bench.speed` (latency against the baselines)."""
