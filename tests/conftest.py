"""Shared test settings: one hypothesis profile for the whole suite.

Machines here are shared and noisy, so no per-example deadline; a moderate
number of examples keeps the suite inside its time budget. Select another
profile with ``--hypothesis-profile`` (e.g. ``thorough`` for a long run).
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "mmsim",
    deadline=None,
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("mmsim")
