"""Shared test settings: float64 determinism, a --runslow switch, hypothesis profiles."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU interpreter in tests

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles (select with --hypothesis-profile=NAME or GS_HYPOTHESIS_PROFILE=NAME):
#   ci        the default: derandomized (CI is reproducible), each property's own example count
#   dev       random examples, so --hypothesis-seed=N reproduces or varies a run
#   thorough  random, and at least 500 examples per property (see strategies.examples)
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", deadline=None, suppress_health_check=_QUIET, derandomize=True)
settings.register_profile("dev", deadline=None, suppress_health_check=_QUIET)
settings.register_profile("thorough", deadline=None, suppress_health_check=_QUIET, max_examples=500)
settings.load_profile(os.environ.get("GS_HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
