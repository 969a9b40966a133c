"""Hypothesis settings shared by the fuzz targets (tests/test_fuzz_*.py, tests/data/test_fuzz_rows.py).

In CI every target is deterministic (`derandomize=True`: the examples derive from the test's name, no
example database), with a small budget so the suite stays fast. `SLIMTUNE_FUZZ=long` runs each target
with 20x the examples and fresh random seeds, for a local hunt (see the README).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG = os.environ.get("SLIMTUNE_FUZZ") == "long"


def fuzz_settings(examples: int) -> settings:
    """`examples` cases in CI (deterministic); 20x that, random, with SLIMTUNE_FUZZ=long."""
    return settings(
        max_examples=examples * 20 if LONG else examples,
        derandomize=not LONG,
        database=None,
        deadline=None,  # a case's time depends on the machine's load, not on what is being tested
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
        print_blob=True,
    )
