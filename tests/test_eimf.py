"""EIMF: the auxiliary losses against loops, gradients, the lambda = 0 identity, LLM-free
inference, and reproduce.sh demo end to end."""
import builtins
import dataclasses
import json
import math
import os
import re
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
            sim[u, w] = sum(max(float(F.cosine_similarity(s[w, j], v[u, k], dim=0))
                                for k in range(v.shape[1])) for j in js) / len(js)
    def negatives(u):  # everyone but the users whose semantic set is identical to u's
        return [w for w in range(B) if w == u or group[w] != group[u]]
    loss_u = [-math.log(math.exp(sim[u, u] / tau)
                        / sum(math.exp(sim[u, w] / tau) for w in negatives(u))) for u in range(B)]
    loss_w = [-math.log(math.exp(sim[w, w] / tau)
                        / sum(math.exp(sim[u, w] / tau) for u in negatives(w))) for w in range(B)]
    return (sum(loss_u) / B + sum(loss_w) / B) / 2


def test_alignment_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    v, s = torch.randn(5, 3, 6, generator=g), torch.randn(5, 4, 6, generator=g)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 3] = mask[2, 2:] = False  # users with fewer semantic interests
    assert bimi.alignment_loss(v, s, mask, 0.1).item() == \
        pytest.approx(loop_alignment(v, s, mask, 0.1), rel=1e-4)
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
            sigmoid = [1 / (1 + math.exp(-zq)) for zq in z]
            total += sum(-(yq * math.log(pq) + (1 - yq) * math.log(1 - pq))
                         for pq, yq in zip(sigmoid, y)) / 7
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
    align = bimi.alignment_loss(interests, head(semantic), torch.ones(3, 2, dtype=torch.bool), 0.1)
    pred = bimi.prediction_loss(interests, head(torch.randn(4, 5)), torch.rand(3, 4), torch.ones(3))
    for loss in (align, pred):
        model.zero_grad()
        loss.backward(retain_graph=True)
        assert model.items.weight.grad[1:10].abs().sum(1).min() > 0
        interests = model(hist)[0]


def small_cfg(synthetic_dir, tmp_path, **kw):
    return bimi.Config(dataset="synthetic", data_dir=synthetic_dir, out_dir=str(tmp_path / "runs"),
                       max_epochs=2, **kw)


def test_zero_lambdas_reproduce_the_backbone_exactly(synthetic_dir, tmp_path):
    ecfg = bimi.EsimConfig(clusters=10, prototypes=8)
    base = small_cfg(synthetic_dir, tmp_path)
    backbone = json.load(open(os.path.join(bimi.train(base, ecfg), "metrics.json")))
    eimf = dataclasses.replace(base, eimf="categories", lambda_align=0.0, lambda_pred=0.0)
    out = bimi.train(eimf, ecfg)
    record = json.load(open(os.path.join(out, "metrics.json")))
    assert record["test"] == backbone["test"] and record["valid"] == backbone["valid"]
    # and with the default weights the auxiliary tasks do change training
    weighted = dataclasses.replace(eimf, lambda_align=0.1, lambda_pred=0.5)
    changed = json.load(open(os.path.join(bimi.train(weighted, ecfg), "metrics.json")))
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
    result = json.load(open(tmp_path / "results" / "synthetic-max_epochs=5-seeds=2.json"))
    rows = [r["row"] for r in result["rows"]]
    first = [row[0] for row in bimi.table_rows("categories", bimi.MODELS, True)]
    assert [row for row in rows if row in first] == first
    gains = {r["model"]: r["gain_pct"] for r in result["rows"]
             if r["row"] == r["model"] + " + EIMF"}
    for row in set(rows) - set(first):  # a control is added for a gain that excludes zero
        assert row.endswith(", shuffled semantics") and any(
            g["ci95"][0] > 0 or g["ci95"][1] < 0 for g in gains[row.split(" + ")[0]].values())
    assert len(result["meta"]["code_versions"]) == 1
    tests = {r["row"]: [json.load(open(os.path.join(tmp_path, run, "metrics.json")))["test"]
                        for run in r["runs"]] for r in result["rows"]}
    for r in result["rows"]:
        assert len(tests[r["row"]]) == 2 and tests[r["row"]][0]["recall@20"] > 0
        for metric, (mean, std) in r["mean_std"].items():  # mean and sample std, by hand
            a, b = (t[metric] for t in tests[r["row"]])
            assert mean == pytest.approx((a + b) / 2)
            assert std == pytest.approx(abs(a - b) / 2 ** 0.5)
    backbone = {r["model"]: r for r in result["rows"] if not r["eimf"]}
    for r in result["rows"]:
        if r["eimf"]:
            for m in ("recall@20", "ndcg@20"):  # the mean per-user gain is the gain of the means
                base = backbone[r["model"]]["mean_std"][m][0]
                gain = r["gain_pct"][m]
                assert gain["gain"] == pytest.approx(100 * (r["mean_std"][m][0] - base) / base)
                assert gain["ci95"][0] <= gain["gain"] <= gain["ci95"][1]
    table = open(tmp_path / "results" / "synthetic-max_epochs=5-seeds=2.md").read()
    assert all(row in table for row in rows) and "[95 % CI]" in table
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0
    assert "training " not in second.stdout  # every run was reused
    reused = set(re.findall(r"reusing finished run (\S+)", second.stdout))
    assert len(reused) == len(rows) * 2  # 4 backbones and the EIMF rows, 2 seeds each


def test_reproduce_sh_runs_a_users_own_dataset_by_name(own_dataset, tmp_path):
    env = dict(os.environ, BIMI_PYTHON=sys.executable)
    env.pop("OPENAI_BASE_URL", None)
    run = subprocess.run(["bash", os.path.join(ROOT, "reproduce.sh"), "ml", "--data_dir",
                          own_dataset, "--seeds", "1", "--models", "comirec-sa",
                          "--ablations", "0", "--max_epochs", "1", "--clusters", "5"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "typical users are 33 % of the 60 training users" in run.stdout
    name = "ml-ablations=0-clusters=5-max_epochs=1-models=comirec-sa-seeds=1"
    table = (tmp_path / "results" / f"{name}.md").read_text()
    assert "| comirec-sa + EIMF |" in table and "bash reproduce.sh ml --data_dir" in table
    cpu = {}  # the digits hold on one kind of CPU: the footer names it, for the table and runs
    for line in open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else ():
        cpu.setdefault(line.split(":")[0].strip(), line.partition(":")[2].strip())
    if "cpu family" in cpu:
        kind = (f"{cpu['model name']} (family {cpu['cpu family']}, model {cpu['model']}, "
                f"{torch.backends.cpu.get_cpu_capability()} kernels)")
        assert f"cores of {kind}, torch" in table and f"on {kind} with " in table


# textbook table
T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 5: 2.5706, 10: 2.2281, 30: 2.0423, math.inf: 1.9600}


def slow_t_quantile(p, df):
    """Student's t quantile by bisection on its CDF, the density integrated by Simpson's rule."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(q, n=4000):  # P(0 < T < q) + 0.5
        h = q / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    lo, hi = 0.0, 100.0
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if cdf((lo + hi) / 2) < p else (lo, (lo + hi) / 2)
    return (lo + hi) / 2


def slow_gain_interval(backbone, eimf):
    """The interval by its definition, one user and one seed at a time: the users' variance of the
    ratio of means (delta method), the seeds' variance of the per-seed gains over S, Welch's df."""
    S, U = len(backbone), len(backbone[0])
    base = [sum(backbone[s][u] for s in range(S)) / S for u in range(U)]
    diff = [sum(eimf[s][u] - backbone[s][u] for s in range(S)) / S for u in range(U)]
    mean_base = sum(base) / U
    gain = sum(diff) / U / mean_base
    resid = [d - gain * b for d, b in zip(diff, base)]
    var_users = sum((r - sum(resid) / U) ** 2 for r in resid) / (U - 1) / U / mean_base ** 2
    per_seed = [sum(eimf[s][u] - backbone[s][u] for u in range(U)) / sum(backbone[s])
                for s in range(S)]
    var_seeds = sum((g - sum(per_seed) / S) ** 2 for g in per_seed) / (S - 1) / S
    df = (var_users + var_seeds) ** 2 / (var_seeds ** 2 / (S - 1))
    half = slow_t_quantile(0.975, df) * math.sqrt(var_users + var_seeds)
    return 100 * gain, 100 * (gain - half), 100 * (gain + half)


def test_t_quantile_matches_the_table_and_a_slow_integration():
    for df, t in T_975.items():
        assert bimi.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    for df in (1.7, 2.0, 4.4, 12.3):
        assert bimi.t_quantile(0.975, df) == pytest.approx(slow_t_quantile(0.975, df), abs=1e-5)


def test_gain_interval_matches_slow_reference_and_the_user_bootstrap():
    rng = np.random.default_rng(3)
    backbone = (rng.random((3, 400)) < 0.1).astype(float)          # loo: a user's recall is 0 or 1
    eimf = np.where(rng.random((3, 400)) < 0.05, 1 - backbone, backbone)
    fast = bimi.gain_interval(backbone, eimf)
    slow = slow_gain_interval(backbone.tolist(), eimf.tolist())
    assert np.allclose(fast, slow, rtol=1e-6) and fast[1] < fast[0] < fast[2]
    assert bimi.gain_interval(backbone, backbone.copy()) == (0.0, 0.0, 0.0)
    # with one seed (no seeds' share) the half-width is 1.96 x the sd of a user bootstrap
    one = (rng.random((1, 5000)) < 0.1).astype(float)
    two = np.where(rng.random((1, 5000)) < 0.05, 1 - one, one)
    gains = [two[0, i].sum() / one[0, i].sum() - 1
             for i in rng.integers(0, 5000, size=(2000, 5000))]
    _, low, high = bimi.gain_interval(one, two)
    assert (high - low) / 2 == pytest.approx(100 * 1.96 * np.std(gains), rel=0.05)
    # runs save float32 per-user metrics: the result is still plain floats (JSON), to float64
    # precision
    single = bimi.gain_interval(backbone.astype(np.float32), eimf.astype(np.float32))
    assert json.loads(json.dumps(single)) == pytest.approx(list(fast), rel=1e-12)


def test_gain_interval_covers_95_percent_at_beautys_seed_spread():
    """Simulated tables at Beauty's size: 22,363 test users of random difficulty, 3 seeds whose
    models are each 2.8 % better or worse (Beauty's ComiRec-SA seed spread), a true gain of 5 %. The
    interval covers the truth about 95 % of the time; over users alone it covers about 2 in 3."""
    rng = np.random.default_rng(0)
    users, seeds, spread, gain, covered, users_only = 22363, 3, 0.028, 0.05, 0, 0
    for _ in range(300):
        p = rng.beta(0.3, 0.3 * (1 - 0.107) / 0.107, users)  # hit probabilities, mean 0.107
        quality = 1 + spread * rng.standard_normal((2, seeds, 1))
        backbone = (rng.random((seeds, users)) < p * quality[0]).astype(np.float32)
        eimf = (rng.random((seeds, users)) < p * (1 + gain) * quality[1]).astype(np.float32)
        _, low, high = bimi.gain_interval(backbone, eimf)
        covered += low <= 100 * gain <= high
        g, low, high = bimi.gain_interval(backbone.mean(0, keepdims=True),
                                          eimf.mean(0, keepdims=True))
        users_only += low <= 100 * gain <= high
    print(f"coverage: {covered / 300:.3f} (users and seeds), {users_only / 300:.3f} (users only)")
    assert 0.91 <= covered / 300 <= 0.98 and users_only / 300 < 0.8
