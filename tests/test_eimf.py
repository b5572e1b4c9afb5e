"""EIMF: the auxiliary losses against loops, gradients, the lambda = 0 identity, LLM-free
inference, and reproduce.sh demo end to end."""
import builtins
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bimi
from conftest import ROOT


def loop_alignment(v, s, mask, tau, group=None):
    B = len(v)
    group = list(range(B)) if group is None else group
    sim = torch.zeros(B, B)
    for u in range(B):
        for w in range(B):
            js = [j for j in range(s.shape[1]) if mask[w, j]]
            sim[u, w] = sum(max(float(F.cosine_similarity(s[w, j], v[u, k], dim=0)) for k in range(v.shape[1]))
                            for j in js) / len(js)
    def negatives(u):  # everyone but the users whose semantic set is identical to u's
        return [w for w in range(B) if w == u or group[w] != group[u]]
    loss_u = [-math.log(math.exp(sim[u, u] / tau) / sum(math.exp(sim[u, w] / tau) for w in negatives(u)))
              for u in range(B)]
    loss_w = [-math.log(math.exp(sim[w, w] / tau) / sum(math.exp(sim[u, w] / tau) for u in negatives(w)))
              for w in range(B)]
    return (sum(loss_u) / B + sum(loss_w) / B) / 2


def test_alignment_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    v, s = torch.randn(5, 3, 6, generator=g), torch.randn(5, 4, 6, generator=g)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 3] = mask[2, 2:] = False  # users with fewer semantic interests
    assert bimi.alignment_loss(v, s, mask, 0.1).item() == pytest.approx(loop_alignment(v, s, mask, 0.1), rel=1e-4)
    group = torch.tensor([0, 1, 0, 2, 1])  # users 0 and 2, 1 and 4 have identical semantic sets
    assert bimi.alignment_loss(v, s, mask, 0.1, group).item() == \
        pytest.approx(loop_alignment(v, s, mask, 0.1, group.tolist()), rel=1e-4)


def test_alignment_is_lowest_when_behaviour_and_semantics_agree():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(8, 4, 16, generator=g)
    mask = torch.ones(8, 4, dtype=torch.bool)
    agree = bimi.alignment_loss(v, v + 0.01 * torch.randn(8, 4, 16, generator=g), mask, 0.1)
    shuffled = bimi.alignment_loss(v, v[torch.randperm(8, generator=g)], mask, 0.1)
    unrelated = bimi.alignment_loss(v, torch.randn(8, 4, 16, generator=g), mask, 0.1)
    assert agree < 0.1                        # each user's own semantics is the clear match
    assert unrelated > math.log(8) / 2        # chance is log 8 with 8 candidates
    assert shuffled > math.log(8)             # another user's semantics: worse than chance


def test_prediction_loss_matches_loop():
    g = torch.Generator().manual_seed(2)
    v, p = torch.randn(6, 3, 5, generator=g), torch.randn(7, 5, generator=g)
    labels, weights = torch.rand(6, 7, generator=g), torch.tensor([1.0, 1, 0, 1, 1, 0])
    total = 0.0
    for b in range(6):
        if weights[b]:
            z = [max(float(v[b, k] @ p[q]) for k in range(3)) for q in range(7)]
            y = labels[b].tolist()
            total += sum(-(yq * math.log(1 / (1 + math.exp(-zq))) + (1 - yq) * math.log(1 - 1 / (1 + math.exp(-zq))))
                         for zq, yq in zip(z, y)) / 7
    assert bimi.prediction_loss(v, p, labels, weights).item() == pytest.approx(total / 4, rel=1e-5)


@pytest.mark.parametrize("model_name", bimi.MODELS)
def test_gradients_reach_the_encoder_through_both_losses(model_name):
    cfg = bimi.Config(model=model_name, dim=8, interests=3, max_len=6)
    torch.manual_seed(0)
    model = bimi.make_model(cfg, n_items=30)
    head = torch.nn.Linear(5, 8)
    hist = torch.tensor([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 0, 0], [8, 9, 0, 0, 0, 0]])
    interests = model(hist)[0]
    semantic = torch.randn(3, 2, 5)
    for loss in (bimi.alignment_loss(interests, head(semantic), torch.ones(3, 2, dtype=torch.bool), 0.1),
                 bimi.prediction_loss(interests, head(torch.randn(4, 5)), torch.rand(3, 4), torch.ones(3))):
        model.zero_grad()
        loss.backward(retain_graph=True)
        assert model.items.weight.grad[1:10].abs().sum(1).min() > 0
        interests = model(hist)[0]


def small_cfg(synthetic_dir, tmp_path, **kw):
    return bimi.Config(dataset="synthetic", data_dir=synthetic_dir, out_dir=str(tmp_path / "runs"), max_epochs=2, **kw)


def test_zero_lambdas_reproduce_the_backbone_exactly(synthetic_dir, tmp_path):
    ecfg = bimi.EsimConfig(clusters=10, prototypes=8)
    base = small_cfg(synthetic_dir, tmp_path)
    backbone = json.load(open(os.path.join(bimi.train(base, ecfg), "metrics.json")))
    eimf = dataclasses.replace(base, eimf="categories", lambda_align=0.0, lambda_pred=0.0)
    out = bimi.train(eimf, ecfg)
    record = json.load(open(os.path.join(out, "metrics.json")))
    assert record["test"] == backbone["test"] and record["valid"] == backbone["valid"]
    # and with the default weights the auxiliary tasks do change training
    changed = json.load(open(os.path.join(bimi.train(dataclasses.replace(eimf, lambda_align=0.1, lambda_pred=0.5),
                                                     ecfg), "metrics.json")))
    assert changed["valid"] != backbone["valid"]
    # the evaluated model holds the encoder only; the head lives beside it
    state = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    backbone_state = torch.load(os.path.join(bimi.run_dir(base), "model.pt"), weights_only=True)
    assert set(state) == set(backbone_state)
    assert set(torch.load(os.path.join(out, "heads.pt"), weights_only=True)) == {"weight", "bias"}


def test_inference_makes_no_network_call_and_reads_no_file(synthetic_dir, tmp_path, monkeypatch):
    cfg = small_cfg(synthetic_dir, tmp_path, eimf="categories")
    ecfg = bimi.EsimConfig(clusters=10, prototypes=8)
    out = bimi.train(cfg, ecfg)
    data = bimi.load_dataset(synthetic_dir, "synthetic")
    split = bimi.make_split(data, "loo")
    model = bimi.make_model(cfg, data.n_items)
    model.load_state_dict(torch.load(os.path.join(out, "model.pt"), weights_only=True))
    hist, seen = torch.from_numpy(split.test.hist[:64]), torch.from_numpy(split.test.seen[:64])

    def forbidden(*args, **kwargs):
        raise AssertionError("inference touched the network or a file")
    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(bimi.requests, "post", forbidden)
    monkeypatch.setattr(builtins, "open", forbidden)
    top = bimi.recommend(model, hist, seen, 20)
    monkeypatch.undo()
    assert top.shape == (64, 20)
    assert not any(int(i) in set(split.test.seen[r]) for r in range(64) for i in top[r])


def test_reproduce_demo_end_to_end_and_second_call_reuses_everything(tmp_path):
    env = dict(os.environ, BIMI_PYTHON=sys.executable)
    env.pop("OPENAI_BASE_URL", None)
    cmd = ["bash", os.path.join(ROOT, "reproduce.sh"), "demo", "--seeds", "2"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "categories backend" in first.stdout
    result = json.load(open(tmp_path / "results" / "synthetic.json"))
    rows = [row[0] for row in bimi.ROWS if "categories backend" not in row[0]]  # the main backend is categories
    assert [r["row"] for r in result["rows"]] == rows
    assert len(result["meta"]["code_versions"]) == 1
    tests = {r["row"]: [json.load(open(os.path.join(tmp_path, run, "metrics.json")))["test"] for run in r["runs"]]
             for r in result["rows"]}
    for r in result["rows"]:
        assert len(tests[r["row"]]) == 2 and tests[r["row"]][0]["recall@20"] > 0
        for metric, (mean, std) in r["mean_std"].items():  # mean and sample std, by hand
            a, b = (t[metric] for t in tests[r["row"]])
            assert mean == pytest.approx((a + b) / 2) and std == pytest.approx(abs(a - b) / 2 ** 0.5)
    backbone = {r["model"]: r for r in result["rows"] if not r["eimf"]}
    for r in result["rows"]:
        if r["eimf"]:
            for m in ("recall@20", "ndcg@20"):  # the mean per-user gain is the gain of the means
                base = backbone[r["model"]]["mean_std"][m][0]
                gain = r["gain_pct"][m]
                assert gain["gain"] == pytest.approx(100 * (r["mean_std"][m][0] - base) / base)
                assert gain["ci95"][0] <= gain["gain"] <= gain["ci95"][1]
    table = open(tmp_path / "results" / "synthetic.md").read()
    assert all(row in table for row in rows) and "[95 % CI]" in table
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0
    assert "training " not in second.stdout  # every run was reused
    assert second.stdout.count("reusing finished run") == len(rows) * 2


def test_reproduce_sh_runs_a_users_own_dataset_by_name(tmp_path):
    rng = np.random.default_rng(0)  # 60 users, 40 items in 4 genres: MovieLens-like, tiny
    data = tmp_path / "mine" / "ml"
    data.mkdir(parents=True)
    (data / "sequences.txt").write_text("".join(
        f"{u} " + " ".join(map(str, rng.choice(np.arange(1, 41), 8, replace=False))) + "\n"
        for u in range(1, 61)))
    (data / "items.jsonl").write_text("".join(json.dumps(
        {"item_id": i, "title": f"Film {i}", "categories": [["Films", f"Genre {i % 4}"]]}) + "\n"
        for i in range(1, 41)))
    env = dict(os.environ, BIMI_PYTHON=sys.executable)
    env.pop("OPENAI_BASE_URL", None)
    run = subprocess.run(["bash", os.path.join(ROOT, "reproduce.sh"), "ml", "--data_dir",
                          str(tmp_path / "mine"), "--seeds", "1", "--models", "comirec-sa",
                          "--ablations", "0", "--max_epochs", "1", "--clusters", "5"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "typical users are 33 % of the 60 training users" in run.stdout
    table = (tmp_path / "results" / "ml-comirec-sa-no-ablations.md").read_text()
    assert "| comirec-sa + EIMF |" in table and "bash reproduce.sh ml --data_dir" in table


def slow_paired_bootstrap(backbone, eimf, resamples, seed):
    """The interval by the textbook recipe, one user and one resample at a time."""
    n_seeds, n_users = len(backbone), len(backbone[0])
    diff = [sum(eimf[s][u] - backbone[s][u] for s in range(n_seeds)) / n_seeds for u in range(n_users)]
    base = [sum(backbone[s][u] for s in range(n_seeds)) / n_seeds for u in range(n_users)]
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(resamples):
        pick = rng.integers(0, n_users, size=n_users)
        gains.append(sum(diff[u] for u in pick) / sum(base[u] for u in pick))
    gains.sort()

    def percentile(q):  # numpy's default: linear between the closest ranks
        pos = q / 100 * (len(gains) - 1)
        lo = int(pos)
        return gains[lo] + (gains[min(lo + 1, len(gains) - 1)] - gains[lo]) * (pos - lo)
    return 100 * sum(diff) / sum(base), 100 * percentile(2.5), 100 * percentile(97.5)


def test_paired_bootstrap_matches_slow_reference():
    rng = np.random.default_rng(3)
    backbone = (rng.random((3, 250)) < 0.1).astype(float)          # loo: a user's recall is 0 or 1
    eimf = np.where(rng.random((3, 250)) < 0.05, 1 - backbone, backbone)
    fast = bimi.paired_bootstrap(backbone, eimf, resamples=1000, seed=7)
    slow = slow_paired_bootstrap(backbone.tolist(), eimf.tolist(), 1000, 7)
    assert np.allclose(fast, slow, rtol=1e-10)
    assert fast[1] < fast[0] < fast[2]
    same = bimi.paired_bootstrap(backbone, backbone.copy(), resamples=200)
    assert same == (0.0, 0.0, 0.0)
    # runs save float32 per-user metrics: the result is still plain floats (JSON), to float64 precision
    single = bimi.paired_bootstrap(backbone.astype(np.float32), eimf.astype(np.float32), resamples=1000, seed=7)
    assert json.loads(json.dumps(single)) == pytest.approx(list(fast), rel=1e-12)
