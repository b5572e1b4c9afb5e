import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(ROOT, "..", "shared", "data")

import data_prep  # noqa: E402


def shared_beauty():
    if not os.path.exists(os.path.join(SHARED, "beauty", "sequences.txt")):
        pytest.skip("../shared/data/beauty is absent (a user's clone has no ../shared)")
    return SHARED


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """The synthetic dataset, generated once per test session (never committed)."""
    out = tmp_path_factory.mktemp("data")
    data_prep.prepare("synthetic", str(out))
    return str(out)
