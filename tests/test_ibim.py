"""IBIM: metrics and ties against loops, REMI's losses against a transcription of its code, the
max-over-interests ranking against ComiRec's merge, the encoders' invariances, and short real
trainings on the synthetic dataset."""
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import bimi
from conftest import ROOT


class FixedInterests(torch.nn.Module):
    """A stand-in encoder: user row r (passed as hist[:, 0] = r + 1) has the given interests."""

    def __init__(self, interests, table):
        super().__init__()
        self.interests = interests
        self.items = torch.nn.Embedding.from_pretrained(table)

    def forward(self, hist):
        return self.interests[hist[:, 0] - 1], None


def user_rows(users):
    return torch.arange(1, users + 1).unsqueeze(1)  # (users, 1): FixedInterests' row r + 1


def reference_metrics(scores, seen, targets, n):
    """Loop version of the README's ranking (Protocol): sort the unseen items by (-score, id),
    cut at n; per user."""
    out = {"recall": [], "ndcg": [], "hitrate": []}
    for s, h, t in zip(scores, seen, targets):
        t = [x for x in t if x > 0]
        ranking = sorted((i for i in range(1, len(s)) if i not in set(h)),
                         key=lambda i: (-s[i], i))[:n]
        hits = [r for r, i in enumerate(ranking, 1) if i in t]
        out["recall"].append(len(hits) / len(t))
        out["hitrate"].append(1.0 if hits else 0.0)
        idcg = sum(1 / math.log2(j + 1) for j in range(1, min(len(t), n) + 1))
        out["ndcg"].append(sum(1 / math.log2(r + 1) for r in hits) / idcg)
    return {f"{k}@{n}": np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_loop_reference_with_ties_and_masked_targets(seed):
    g = torch.Generator().manual_seed(seed)
    users, n_items, K, d = 40, 60, 3, 4
    table = torch.randint(-2, 3, (n_items + 1, d), generator=g).float()  # small integers: many ties
    interests = torch.randint(-2, 3, (users, K, d), generator=g).float()
    rng = np.random.default_rng(seed)
    seen = np.zeros((users, 8), dtype=np.int64)
    targets = np.zeros((users, 6), dtype=np.int64)
    for u in range(users):
        items = rng.permutation(np.arange(1, n_items + 1))
        n_seen, n_t = rng.integers(1, 9), rng.integers(1, 7)
        seen[u, :n_seen] = items[:n_seen]
        targets[u, :n_t] = items[n_seen:n_seen + n_t]
        if u % 5 == 0:  # a target already in the history: it can never be hit, but counts in |T|
            targets[u, 0] = seen[u, 0]
    model = FixedInterests(interests, table)
    evalset = bimi.EvalSet(np.arange(users), user_rows(users).numpy(), seen, targets)
    # 1 and 3 are below some users' target counts; 60 lists every unseen item
    cutoffs = (1, 3, 5, 20, 60)
    full = (interests @ table.T).amax(1).numpy()  # (users, n_items + 1), unmasked
    means = bimi.evaluate(model, evalset, "cpu", batch=7, cutoffs=cutoffs)
    for batch in (7, users):  # batches of mixed widths, and one batch
        ours = bimi.evaluate_per_user(functools.partial(bimi.score_items, model), evalset, "cpu",
                                      batch, cutoffs)
        for n in cutoffs:
            for k, v in reference_metrics(full, seen, targets, n).items():
                np.testing.assert_allclose(ours[k], v, atol=1e-6, err_msg=f"{k} batch {batch}")
                assert means[k] == pytest.approx(v.mean(), abs=1e-6)


def test_max_over_interests_equals_comirec_merge():
    g = torch.Generator().manual_seed(3)
    users, n_items, K, d, n = 30, 500, 4, 16, 20
    table = torch.randn(n_items + 1, d, generator=g)
    interests = torch.randn(users, K, d, generator=g)
    seen = torch.randint(1, n_items + 1, (users, 10), generator=g)
    model = FixedInterests(interests, table)
    ours = bimi.recommend(model, user_rows(users), seen, n)
    for u in range(users):
        pool = []  # ComiRec: top-n per interest, pooled, sorted by score, de-duplicated
        for k in range(K):
            s = table @ interests[u, k]
            s[0] = -math.inf
            s[seen[u]] = -math.inf
            top = torch.topk(s, n)
            pool += list(zip(top.values.tolist(), top.indices.tolist()))
        merged, taken = [], set()
        for score, item in sorted(pool, reverse=True):
            if item not in taken:
                taken.add(item)
                merged.append(item)
        assert ours[u].tolist() == merged[:n]


@pytest.mark.parametrize("n", [1, 7, 30, 200])
def test_recommend_breaks_ties_toward_the_lower_item_id(n):
    g = torch.Generator().manual_seed(n)
    users, n_items, K, d = 50, 200, 2, 3
    # 27 distinct vectors: huge tie groups
    table = torch.randint(-1, 2, (n_items + 1, d), generator=g).float()
    interests = torch.randint(-1, 2, (users, K, d), generator=g).float()
    # n = 200 reaches the -inf items too
    seen = torch.randint(0, n_items + 1, (users, 150), generator=g)
    ours = bimi.recommend(FixedInterests(interests, table), user_rows(users), seen, n)
    scores = (interests @ table.T).amax(1)
    for u in range(users):
        masked = {0, *seen[u].tolist()}
        s = [-math.inf if i in masked else float(scores[u, i]) for i in range(n_items + 1)]
        assert ours[u].tolist() == sorted(range(n_items + 1), key=lambda i: (-s[i], i))[:n]


@pytest.mark.parametrize("model_name", bimi.MODELS)
def test_an_empty_history_is_a_clear_error_never_nan(model_name):
    cfg = bimi.Config(model=model_name, max_len=6, dim=8, interests=3)
    torch.manual_seed(0)
    model = bimi.make_model(cfg, n_items=30).eval()
    hist = torch.tensor([[3, 9, 4, 0, 0, 0], [0, 0, 0, 0, 0, 0], [7, 1, 0, 0, 0, 0]])
    seen = hist.clone()
    with pytest.raises(ValueError, match="1 users have an empty history"):
        bimi.recommend(model, hist, seen, 5)
    scores = bimi.score_items(model, hist[[0, 2]], seen[[0, 2]])
    assert not scores.isnan().any() and torch.isfinite(scores[:, 1:]).sum() == 2 * 30 - 5


@pytest.mark.parametrize("model_name", bimi.MODELS)
def test_encoder_shapes_padding_and_gradients(model_name):
    cfg = bimi.Config(model=model_name, max_len=12, dim=8, interests=3)
    torch.manual_seed(0)
    model = bimi.make_model(cfg, n_items=50)
    hist = torch.tensor([[3, 9, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                         [7, 1, 2, 5, 8, 11, 12, 13, 14, 15, 16, 17]])
    interests, attention = model(hist)
    assert interests.shape == (2, 3, 8) and attention.shape == (2, 3, 12)
    assert torch.all(attention[0, :, 3:] == 0)  # padding gets no weight
    shorter, _ = model(hist[:1, :6])  # the same history with less padding
    torch.testing.assert_close(interests[:1], shorter, rtol=1e-5, atol=1e-6)
    alone, _ = model(hist[1:])  # batch-mates do not matter
    torch.testing.assert_close(interests[1:], alone, rtol=1e-5, atol=1e-6)
    target = torch.tensor([20, 30])
    user = bimi.hard_readout(interests, model.items.weight[target])
    loss = bimi.recommendation_loss(user, target, model.items.weight, cfg)
    if model_name == "remi":
        loss = loss + cfg.rlambda * bimi.routing_regularizer(attention, cfg.dim)
    loss.backward()
    grad = model.items.weight.grad
    assert grad[[3, 9, 4, 20, 30]].abs().sum(1).min() > 0  # history items and targets learn
    assert grad[0].abs().sum() == 0  # padding never does


def test_hard_readout_picks_largest_dot_product():
    g = torch.Generator().manual_seed(0)
    interests, targets = torch.randn(50, 4, 8, generator=g), torch.randn(50, 8, generator=g)
    chosen = bimi.hard_readout(interests, targets)
    for b in range(50):
        k = max(range(4), key=lambda k: float(interests[b, k] @ targets[b]))
        assert torch.equal(chosen[b], interests[b, k])


def test_sampled_softmax_and_remi_weighting_against_direct_formula():
    g = torch.Generator().manual_seed(0)
    user, table = torch.randn(5, 8, generator=g), torch.randn(31, 8, generator=g)
    target = torch.tensor([1, 4, 9, 16, 25])
    cfg = bimi.Config(model="remi", loss="full", rbeta=0.5)
    ours = bimi.recommendation_loss(user, target, table, cfg)
    losses = []
    # -s_pos + log(exp(s_pos) + sum_j w_j exp(s_j)), w = n * softmax(beta * s_neg)
    for b in range(5):
        s = table @ user[b]
        neg = [j for j in range(1, 31) if j != target[b]]
        w = torch.softmax(0.5 * s[neg], 0) * len(neg)
        positive = s[target[b]]
        losses.append(-positive + torch.log(torch.exp(positive) + (w * torch.exp(s[neg])).sum()))
    assert ours.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    plain = bimi.recommendation_loss(user, target, table, bimi.Config(model="comirec-sa"))
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(
        (user @ table.T)[:, 1:], target - 1).item(), rel=1e-5)
    sampled = bimi.Config(loss="sampled", negatives=10)
    gen = torch.Generator().manual_seed(1)
    negatives = torch.randint(1, 31, (10,), generator=torch.Generator().manual_seed(1))
    logits = torch.cat([(user * table[target]).sum(1, keepdim=True), user @ table[negatives].T], 1)
    logits[:, 1:][negatives.unsqueeze(0) == target.unsqueeze(1)] = -math.inf
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    ours = bimi.recommendation_loss(user, target, table, sampled, gen)
    assert ours.item() == pytest.approx(expected.item())


def remi_sampled_softmax(pos, negs, beta):
    """REMI's NCELoss.sampled_softmax_loss with beta != 0 (Tokkiu/REMI, src/BasicModel.py), line by
    line, for one example: pos a 0-d logit, negs a list of 0-d logits."""
    x = [pos] + negs
    top = max(x)
    x = [v - top for v in x]                              # x = x - max(x)
    pos = torch.exp(x[0])
    neg = [torch.exp(v) for v in x[1:]]
    top_beta = max(beta * v for v in x[1:])
    # imp = exp(beta x_neg - max(beta x_neg)), not detached
    imp = [torch.exp(beta * v - top_beta) for v in x[1:]]
    reweight_neg = sum(i * e for i, e in zip(imp, neg)) / (sum(imp) / len(imp))
    return -(x[0] - torch.log(pos + reweight_neg))


def relative_difference(ours, ref):
    return float(((ours - ref).abs().max() / ref.abs().max()).detach())


@pytest.mark.parametrize("loss", ["full", "sampled"])
@pytest.mark.parametrize("rbeta", [0.1, 1.0, 5.0])
def test_remi_loss_and_gradient_match_remis_code(loss, rbeta):
    g = torch.Generator().manual_seed(0)
    user = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(31, 8, generator=g, dtype=torch.float64, requires_grad=True)
    negatives = torch.randint(1, 31, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    # user 0 draws its own target: an accidental hit
    target = torch.tensor([negatives[0], 4, 9, 16, 25, 30])
    cfg = bimi.Config(model="remi", loss=loss, negatives=12, rbeta=rbeta)
    ours = bimi.recommendation_loss(user, target, table, cfg, torch.Generator().manual_seed(1))
    per_example = []
    for b in range(6):
        s = table @ user[b]
        candidates = range(1, 31) if loss == "full" else negatives
        # the kit never counts the target as a negative
        negs = [s[j] for j in candidates if j != target[b]]
        per_example.append(remi_sampled_softmax(s[target[b]], negs, rbeta))
    ref = torch.stack(per_example).mean()                      # REMI's reduction="elementwise_mean"
    assert relative_difference(ours, ref) < 1e-5
    for a, b in zip(torch.autograd.grad(ours, (user, table)),
                    torch.autograd.grad(ref, (user, table))):
        assert relative_difference(a, b) < 1e-5


def test_routing_regularizer_and_gradient_match_remis_code():
    torch.manual_seed(0)
    cfg = bimi.Config(model="remi", max_len=6, dim=8, interests=3)
    model = bimi.make_model(cfg, n_items=30).double()
    hist = torch.tensor([[3, 9, 4, 0, 0, 0], [7, 1, 2, 5, 8, 11]])
    attention = model(hist)[1]                                 # (2, 3, 6), zero on the padding
    ours = bimi.routing_regularizer(attention, cfg.dim)
    # calculate_atten_loss (Tokkiu/REMI, src/REMI.py) with its bmm, diagonal and norm as loops
    ref = 0
    for b in range(2):
        n2 = 0
        for k in range(3):
            a = attention[b, k]
            # mean over every position, padding included
            c_mean = sum(a) / len(a)
            # diagonal of C_reg C_reg^T / hidden_size
            dr = sum((x - c_mean) * (x - c_mean) for x in a) / cfg.dim
            n2 = n2 + dr ** 2                                  # torch.norm(dr, dim=1) ** 2
        ref = ref + n2                                         # n2.sum(): over the batch
    assert relative_difference(ours, ref) < 1e-5
    # the whole gradient: the heads' bias has none (softmax ignores a shift)
    params = list(model.parameters())
    flat = lambda grads: torch.cat([g.flatten() for g in grads])
    assert relative_difference(flat(torch.autograd.grad(ours, params, retain_graph=True)),
                               flat(torch.autograd.grad(ref, params))) < 1e-5


# ----------------------------------------------------------------------- real training on synthetic


def quick_cfg(synthetic_dir, tmp_path, **kw):
    base = dict(dataset="synthetic", data_dir=synthetic_dir, out_dir=str(tmp_path / "runs"),
                max_epochs=4, patience=2, batch_size=256, lr=0.01)
    base.update(kw)
    return bimi.Config(**base)


def test_every_encoder_beats_popularity_on_synthetic(synthetic_dir, tmp_path):
    data = bimi.load_dataset(synthetic_dir, "synthetic")
    pop = bimi.popularity_metrics(bimi.make_split(data, "loo"), data.n_items)
    for model in bimi.MODELS:
        out = bimi.train(quick_cfg(synthetic_dir, tmp_path, model=model))
        test = json.load(open(os.path.join(out, "metrics.json")))["test"]
        assert test["recall@20"] > 1.5 * pop["recall@20"], (model, test, pop)


def test_same_seed_same_metrics_and_finished_runs_are_reused(synthetic_dir, tmp_path):
    cfg = quick_cfg(synthetic_dir, tmp_path, max_epochs=2, model="mind")
    first = json.load(open(os.path.join(bimi.train(cfg), "metrics.json")))
    out = bimi.train(cfg, force=True)
    second = json.load(open(os.path.join(out, "metrics.json")))
    assert first["test"] == second["test"] and first["valid"] == second["valid"]
    mtime = os.path.getmtime(os.path.join(out, "metrics.json"))
    assert bimi.train(cfg) == out and os.path.getmtime(os.path.join(out, "metrics.json")) == mtime
    saved = json.load(open(os.path.join(out, "config.json")))["config"]
    assert saved == bimi.dataclasses.asdict(cfg)
    state = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert "items.weight" in state
    other = bimi.train(bimi.dataclasses.replace(cfg, seed=2))
    assert other != out


def test_two_processes_on_one_run_train_it_once(synthetic_dir, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bimi.py"), "train", "--dataset", "synthetic",
           "--data_dir", synthetic_dir, "--out_dir", str(tmp_path / "runs"), "--max_epochs", "3"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in first.stdout:  # the first holds the run folder once it trains
        if line.startswith("training "):
            break
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    first_rest = first.communicate(timeout=300)[0]
    assert first.returncode == 0, first_rest
    assert second.returncode == 0, first_rest + second.stdout + second.stderr
    assert "waiting for another process" in second.stdout
    assert "reusing finished run" in second.stdout
    assert "training " not in second.stdout


def test_user_protocol_trains_and_reports_all_cutoffs(synthetic_dir, tmp_path):
    out = bimi.train(quick_cfg(synthetic_dir, tmp_path, protocol="user", max_epochs=2))
    test = json.load(open(os.path.join(out, "metrics.json")))["test"]
    assert set(test) == {f"{m}@{n}" for m in ("recall", "ndcg", "hitrate") for n in (10, 20, 50)}
    assert test["hitrate@50"] >= test["recall@50"] > 0


def test_ctrl_c_leaves_a_readable_record(synthetic_dir, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bimi.py"), "train", "--dataset", "synthetic",
           "--data_dir", synthetic_dir, "--out_dir", str(tmp_path / "runs"), "--max_epochs", "100",
           "--patience", "100"]
    # a harness that runs in the background (`cmd &`) starts us with SIGINT ignored, which the
    # child would inherit; restore the default so that Python turns SIGINT into KeyboardInterrupt
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("epoch   1"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[0]
    assert "interrupted" in rest
    (metrics,) = [os.path.join(r, f, "metrics.json") for r, ds, fs in os.walk(tmp_path / "runs")
                  for f in ds if os.path.exists(os.path.join(r, f, "metrics.json"))]
    record = json.load(open(metrics))
    assert record["status"] == "interrupted" and len(record["epochs"]) >= 1


def test_unknown_and_mistyped_options_are_errors():
    with pytest.raises(SystemExit, match="unknown option --lernrate"):
        bimi.parse_overrides(["--lernrate", "1"], bimi.Config())
    with pytest.raises(SystemExit, match="--lr expects float"):
        bimi.parse_overrides(["--lr", "fast"], bimi.Config())
    cfg, ecfg = bimi.parse_overrides(["--lr", "0.01", "--clusters", "7"], bimi.Config(),
                                     bimi.EsimConfig())
    assert cfg.lr == 0.01 and ecfg.clusters == 7
    cfg, opts = bimi.parse_overrides(["--max_epochs=3", "--ablations", "0", "--force", "--seed=-1"],
                                     bimi.Config(), bimi.CommandOptions())
    assert (cfg.max_epochs, opts.ablations, opts.force, cfg.seed) == (3, 0, True, -1)


@pytest.mark.parametrize("argv, needle", [
    (["reproduce", "--models", "sasrec"], "--models expects backbones from"),
    (["reproduce", "--ablations", "2"], "--ablations expects 0 or 1"),
    (["train", "--models", "remi"], "--models is an option of `reproduce`"),
    (["esim", "--max_failed", "1.5"], "--max_failed expects a share"),
    # '²'.isdigit() is True
    (["reproduce", "--seeds", "\u00b2"], "--seeds expects a positive whole number"),
    (["train", "--max_failed"], "--max_failed needs a value (e.g. --max_failed 0.2)"),
    (["train", "--lr", "--seed", "2"], "--lr needs a value (e.g. --lr 0.006)"),
    (["reproduce", "--dataset", "mine", "--data_dir", "/nonexistent"],
     "data_prep.py makes only beauty"),
    (["reproduce", "--model", "remi", "--dataset", "mine", "--data_dir", "/nonexistent"],
     "reproduce sets --model for each row; use --models LIST"),
    # before the data and the backbones, not after
    (["reproduce", "--backend", "llm", "--base_url", "localhost:1", "--dataset", "mine",
      "--data_dir", "/nonexistent"], "--base_url is 'localhost:1': it needs http://"),
    # not the whole argument list
    (["train", "--dataset", "x", "--force", "1"], "'1' is not an option"),
    (["train", "--datset", "beauty"], "unknown option --datset (did you mean --dataset?)"),
    (["reproduce", "--shuffle"], "reproduce sets --shuffle for each row; use its control rows"),
    (["reproduce", "--typical", "random"], "reproduce sets --typical for each row"),
    (["reproduce", "--jobs", "-1"], "--jobs expects a whole number, 0 or more"),
    (["train", "--eimf", "llm", "--base_url", "http://127.0.0.1:9/v1", "--data_dir",
      "/nonexistent"],
     "nothing answers at http://127.0.0.1:9/v1"),  # a wrong port: before any training
])
def test_reproduce_options_are_checked_before_anything_runs(argv, needle):
    with pytest.raises(SystemExit, match=re.escape(needle)):
        bimi.main(argv)


def test_reproduce_sh_checks_options_before_preparing_data(tmp_path):
    env = dict(os.environ, BIMI_PYTHON=sys.executable)
    script = os.path.join(ROOT, "reproduce.sh")
    bad = subprocess.run(["bash", script, "beauty", "--seeds", "0"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--seeds expects a positive whole number" in bad.stderr
    assert os.listdir(tmp_path) == []  # nothing downloaded, no folder made
    if not torch.cuda.is_available():
        gpu = subprocess.run(["bash", script, "beauty", "--device", "cuda"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert gpu.returncode != 0
        assert "--device cuda, but this torch has no usable CUDA" in gpu.stderr
        assert os.listdir(tmp_path) == []
    usage = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--models" in usage.stdout and "--ablations" in usage.stdout
    bare = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60)
    assert bare.returncode != 0 and bare.stdout.startswith("usage: bash reproduce.sh")
    no_python = subprocess.run(["bash", script, "demo"], cwd=tmp_path,
                               env=dict(env, BIMI_PYTHON="/nonexistent/python"),
                               capture_output=True, text=True, timeout=60)
    assert no_python.returncode != 0
    assert "BIMI_PYTHON=/nonexistent/python is not a Python" in no_python.stderr


def test_help_into_a_pipe_that_closes_early_is_no_traceback():
    out = subprocess.run(f"{sys.executable} {os.path.join(ROOT, 'bimi.py')} train --help | head -1",
                         shell=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("usage:") and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("command", ["info", "train", "esim", "bench", "reproduce"])
def test_each_commands_help_names_that_command(command, capsys):
    bimi.main([command, "--help"])
    usage, what = capsys.readouterr().out.splitlines()[:2]
    assert usage == f"usage: python bimi.py {command} [--key value ...]"
    # its line of --help
    assert what.strip() and what.strip().split()[0] in bimi.USAGE.split(f"\n  {command} ")[1]


def test_no_table_overwrites_another():
    def name(*args):  # the file name of `reproduce --dataset beauty ARGS`, as main types it
        cfg, ecfg, opts = bimi.parse_overrides(["--dataset", "beauty", *args], bimi.Config(),
                                               bimi.EsimConfig(), bimi.CommandOptions(),
                                               command="reproduce")
        return bimi.table_name(cfg, ecfg, opts,
                               {a.partition("=")[0][2:] for a in args if a.startswith("--")})
    assert name() == "beauty"
    assert name("--seeds", "3", "--jobs", "2", "--data_dir", "x", "--embedder", "hash") == "beauty"
    variants = [(), ("--seeds", "1"), ("--seeds", "2"), ("--models", "comirec-sa"),
                ("--models", "mind,remi"), ("--ablations", "0"),
                ("--models", "comirec-sa", "--ablations", "0"), ("--lr", "0.003"),
                ("--lambda_align=0.05",), ("--backend", "llm"),
                ("--backend", "llm", "--esim_seed", "1"),
                ("--backend", "llm", "--chat_model", "Qwen/Qwen2.5-7B")]
    names = [name(*v) for v in variants]
    assert len(set(names)) == len(names)
    assert name("--models", "remi,mind") == "beauty-models=mind,remi"
    assert name("--backend", "llm", "--chat_model", "Qwen/Qwen2.5-7B") \
        == "beauty-backend=llm-chat_model=Qwen_Qwen2.5-7B"


def test_table_rows_follow_models_ablations_and_backend():
    labels = lambda *a: [row[0] for row in bimi.table_rows(*a)]
    assert labels("categories", ["comirec-sa"], False) == ["comirec-sa", "comirec-sa + EIMF",
                                                           "comirec-sa + EIMF, shuffled semantics"]
    assert labels("llm", ["comirec-sa"], False) == ["comirec-sa", "comirec-sa + EIMF",
                                                    "comirec-sa + EIMF, shuffled semantics",
                                                    "comirec-sa + EIMF, categories backend"]
    assert labels("categories", ["mind", "remi"], True) \
        == ["mind", "remi", "mind + EIMF", "remi + EIMF"]
    assert len(labels("categories", bimi.MODELS, True)) == 12
    assert len(labels("llm", bimi.MODELS, True)) == 13
    assert labels("categories", ["comirec-sa"], False, ["comirec-sa"]) \
        == labels("categories", ["comirec-sa"], False)
    assert labels("categories", ["mind", "comirec-sa"], False, ["mind"])[-1] \
        == "mind + EIMF, shuffled semantics"
