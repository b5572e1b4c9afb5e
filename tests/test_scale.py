"""Scale: the synthetic generator's size options (the default dataset pinned), popularity through
the evaluation loop against a loop reference, and the bench command's JSON line."""
import hashlib
import json

import numpy as np
import pytest

import bimi
import data_prep
from test_ibim import reference_metrics


def test_default_synthetic_dataset_never_changes():
    # the 2,000 x 1,000 dataset of the demo and the tests, byte for byte
    text = json.dumps(data_prep.make_synthetic(0))
    assert hashlib.sha256(text.encode()).hexdigest() \
        == "f8d4988c5c0627cc31e2fb915da00e10aeb35dae7b17481faa72cb0803c2a7f5"


def test_synthetic_sizes_are_exact_and_deterministic(tmp_path):
    argv = ["synthetic", "--users", "300", "--items", "5000", "--min-len", "3", "--max-len", "8",
            "--seed", "4"]
    data_prep.main(argv + ["--out", str(tmp_path / "a")])
    data_prep.main(argv + ["--out", str(tmp_path / "b")])
    for name in ("sequences.txt", "items.jsonl"):
        a, b = (tmp_path / run / "synthetic" / name for run in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
    data = bimi.load_dataset(str(tmp_path / "a"), "synthetic")
    assert len(data.sequences) == 300 and data.n_items == 5000  # the whole catalogue, drawn or not
    assert all(3 <= len(s) <= 8 and len(set(s)) == len(s) for s in data.sequences)
    with pytest.raises(SystemExit, match="max-len distinct items"):
        data_prep.main(["synthetic", "--items", "100", "--out", str(tmp_path / "c")])


def test_popularity_through_the_evaluation_loop_matches_loop_reference(synthetic_dir):
    data = bimi.load_dataset(synthetic_dir, "synthetic")
    split = bimi.make_split(data, "user")  # several targets per user
    ours = bimi.popularity_metrics(split, data.n_items, cutoffs=(5, 20))
    counts = np.bincount(np.concatenate(list(split.train_seqs.values())),
                         minlength=data.n_items + 1).astype(float)
    scores = np.broadcast_to(counts, (len(split.test.users), data.n_items + 1))
    for n in (5, 20):
        for k, v in reference_metrics(scores, split.test.seen, split.test.targets, n).items():
            assert ours[k] == pytest.approx(v.mean(), abs=1e-6), k


def test_bench_one_prints_one_json_line(synthetic_dir, capsys):
    bimi.main(["_bench_one", "--dataset", "synthetic", "--data_dir", synthetic_dir, "--model",
               "remi", "--loss", "sampled", "--bench_steps", "3", "--protocol", "user"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["steps"] == 3 and record["items"] == 1000 and record["test_users"] == 200
    assert record["step_s"] > 0 and record["users_per_s"] > 0 and record["peak_rss_mb"] > 0
