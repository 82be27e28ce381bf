"""Shared test configuration: Hypothesis profiles and the GPU marker."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# "ci": fixed seed, bounded example count (what `nox -s tests` uses); "long": many random examples.
settings.register_profile(
    "ci", derandomize=True, max_examples=150, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", max_examples=3000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
