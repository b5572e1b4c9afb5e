import json
import os
import sys

import numpy as np

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


@pytest.fixture
def own_dataset(tmp_path):
    """A user's own small dataset, MovieLens-like: 60 users, 40 items in 4 genres -> its data_dir
    (tmp_path/mine, dataset "ml")."""
    rng = np.random.default_rng(0)
    data = tmp_path / "mine" / "ml"
    data.mkdir(parents=True)
    (data / "sequences.txt").write_text("".join(
        f"{u} " + " ".join(map(str, rng.choice(np.arange(1, 41), 8, replace=False))) + "\n"
        for u in range(1, 61)))
    (data / "items.jsonl").write_text("".join(json.dumps(
        {"item_id": i, "title": f"Film {i}", "categories": [["Films", f"Genre {i % 4}"]]}) + "\n"
        for i in range(1, 41)))
    return str(tmp_path / "mine")
