"""The version of accel (recorded in plans and reports)."""

__version__ = "0.1.0"
