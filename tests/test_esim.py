"""ESIM: k-means against a naive Lloyd, typical users, parsing, the HTTP client against a real
scriptable server on 127.0.0.1, the persistent cache, a SIGKILL mid-run, and no leakage."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import bimi
from conftest import ROOT
from fake_llm import FakeLLM

# ----------------------------------------------------------------------------- k-means


def naive_lloyd(x, centroids, iters):
    """Textbook Lloyd with Python loops (no empty clusters in the data it is given)."""
    x, c = x.tolist(), centroids.tolist()
    for _ in range(iters):
        distance = lambda p, k: sum((a - b) ** 2 for a, b in zip(p, c[k]))
        assign = [min(range(len(c)), key=lambda k: distance(p, k)) for p in x]
        for k in range(len(c)):
            members = [p for p, a in zip(x, assign) if a == k]
            c[k] = [sum(col) / len(members) for col in zip(*members)]
    return torch.tensor(c), assign


def blobs(n=120, k=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 5
    return centres[torch.arange(n) % k] + torch.randn(n, d, generator=g)


def test_lloyd_matches_naive_loop_from_same_seeding():
    x = blobs().double()
    init = bimi.kmeans_pp(x, 4, torch.Generator().manual_seed(3))
    centroids, assign, inertia, history = bimi.lloyd(x, init, max_iter=8, tol=0)
    ref_c, ref_assign = naive_lloyd(x, init, len(history) - 1)
    torch.testing.assert_close(centroids, ref_c.double())
    assert assign.tolist() == ref_assign
    assert inertia == pytest.approx(float(((x - centroids[assign]) ** 2).sum()))


def test_inertia_never_increases_and_empty_clusters_are_reseeded():
    x = blobs(n=200, k=5, seed=1)
    # the last centroid is far from every point
    init = torch.cat([x[:4], torch.full((1, 3), 1000.0)])
    centroids, assign, _, history = bimi.lloyd(x, init, max_iter=50)
    assert all(b <= a + 1e-3 for a, b in zip(history, history[1:]))
    assert len(set(assign.tolist())) == 5  # the empty cluster came back to life
    assert centroids.abs().max() < 100


def test_kmeans_is_determined_by_seed_and_keeps_best_restart():
    x = blobs(n=300, k=6, seed=2)
    a, b = bimi.kmeans(x, 6, n_init=3, seed=7), bimi.kmeans(x, 6, n_init=3, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    gen = torch.Generator().manual_seed(7)
    inertias = [bimi.lloyd(x, bimi.kmeans_pp(x, 6, gen))[2] for _ in range(3)]
    assert a[2] == min(inertias)
    many = bimi.kmeans(x, 6, n_init=8, seed=7)[2]
    assert many <= a[2]


def test_kmeans_pp_never_draws_a_point_at_zero_distance():
    # 5 sites with 30 copies each: a D^2 draw can only land on a site not yet chosen
    sites = torch.tensor([[0., 0], [10, 0], [0, 10], [10, 10], [5, 5]])
    x = sites.repeat_interleave(30, 0)
    for seed in range(20):
        centroids = bimi.kmeans_pp(x, 5, torch.Generator().manual_seed(seed))
        assert sorted(map(tuple, centroids.tolist())) == sorted(map(tuple, sites.tolist()))


def test_kmeans_pp_draws_proportionally_to_squared_distance():
    # 1,000 points at 0 and one each at 1 and 3: once 0 is drawn, 1 and 3 follow 1 : 9 (D^2)
    x = torch.cat([torch.zeros(1000, 1), torch.tensor([[1.0], [3.0]])])
    second = [bimi.kmeans_pp(x, 2, torch.Generator().manual_seed(s)) for s in range(600)]
    second = [c[1, 0].item() for c in second if c[0, 0].item() == 0]
    assert len(second) > 550 and abs(second.count(3.0) / len(second) - 0.9) < 0.05


def test_chunked_assignment_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1000, 8, generator=g), torch.randn(7, 8, generator=g)
    assign, dist = bimi.assign_points(x, c, (x * x).sum(1), chunk=97)
    for i in range(len(x)):
        d2 = [float(((x[i] - c[j]) ** 2).sum()) for j in range(len(c))]
        assert assign[i].item() == min(range(len(c)), key=d2.__getitem__)
        assert abs(dist[i].item() - min(d2)) < 1e-4


# ----------------------------------------------------------------------------- typical users, texts


def test_select_typical_prefers_near_rich_users_then_longest():
    reps = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0]])
    centroids = torch.tensor([[0.0], [10.0]])
    assign = torch.tensor([0, 0, 0, 0, 1, 1])
    lengths = np.array([2, 9, 5, 7, 3, 4])
    chosen = bimi.select_typical(reps, assign, centroids, lengths, per_cluster=2, min_len=5)
    assert [(r, c) for r, c, _ in chosen] == [(1, 0), (2, 0), (5, 1), (4, 1)]
    # cluster 0: users 1 (dist 1) and 2 (dist 2) have >= 5 items; user 0 is nearer but short.
    # cluster 1 has no rich user: the longest histories fill it (user 5 has 4 items, user 4 has 3)


def test_parse_interests_tolerates_prose_and_rejects_bad_shapes():
    good = {"interests": [{"name": f"n{k}", "description": "d"} for k in range(3)]}
    wrapped = "Sure!\n```json\n" + json.dumps(good) + "\n```\nBye {not json}"
    assert bimi.parse_interests(wrapped, 3) == [(f"n{k}", "d") for k in range(3)]
    with pytest.raises(bimi.ParseError, match="exactly 4"):
        bimi.parse_interests(json.dumps(good), 4)
    with pytest.raises(bimi.ParseError, match="no JSON object"):
        bimi.parse_interests("I think they like makeup.", 3)
    bad = {"interests": [{"name": ""}, {"name": "a"}, {"name": "b"}]}
    with pytest.raises(bimi.ParseError, match="interest 1"):
        bimi.parse_interests(json.dumps(bad), 3)


def test_category_interests_and_hash_embedding():
    data = bimi.Dataset("t", [], ["", "a", "b", "c"],
                        [[], [["B", "Nails"]], [["B", "Eyes"]], [["B", "Nails"], ["B", "Lips"]]])
    # Nails twice; Eyes and Lips once each, Lips more recent
    assert bimi.category_interests(data, np.array([1, 2, 3]), 2) == \
        [("Nails", "B > Nails"), ("Lips", "B > Lips")]
    v = bimi.hash_embed(["nail polish red", "nail polish red", "hiking boots"], 64)
    assert np.allclose(v[0], v[1]) and np.allclose(np.linalg.norm(v, axis=1), 1)
    assert abs(v[0] @ v[2]) < 0.5


# --------------------------------------------------------------------- client against a real server


@pytest.fixture
def server():
    s = FakeLLM(n_interests=3, hang_s=2.0)
    yield s
    s.close()


@pytest.fixture
def server4():
    s = FakeLLM(n_interests=4)
    yield s
    s.close()


def client_for(server, tmp_path, **kw):
    ecfg = bimi.EsimConfig(base_url=server.url, cache_dir=str(tmp_path / "cache"), retry_wait=0.01,
                           timeout=1.0, max_retries=3, **kw)
    return bimi.LLMClient(ecfg, log=lambda m: None)


MESSAGES = [{"role": "system", "content": "s"},
            {"role": "user", "content": "1. Lipstick [Beauty > Lips]"}]


@pytest.mark.parametrize("behaviour", ["429", "500", "drop"])
def test_transient_failures_are_retried_once_then_succeed(server, tmp_path, behaviour):
    server.script = [behaviour]
    client = client_for(server, tmp_path)
    reply = client.chat(MESSAGES)
    assert len(bimi.parse_interests(reply, 3)) == 3
    assert len(server.log) == 2  # the failure and one retry, nothing more


def test_retries_are_bounded(server, tmp_path):
    server.script = ["429"] * 10
    with pytest.raises(bimi.LLMError, match="giving up after 4 attempts: .*rate limited"):
        client_for(server, tmp_path).chat(MESSAGES)
    assert len(server.log) == 4


@pytest.mark.parametrize("behaviour, needle", [("401", "Incorrect API key"),
                                               ("404", "does not exist")])
def test_client_errors_stop_at_once_naming_endpoint_and_model(server, tmp_path, behaviour, needle):
    server.script = [behaviour]
    with pytest.raises(bimi.LLMError) as err:
        client_for(server, tmp_path, chat_model="my-model").chat(MESSAGES)
    text = str(err.value)
    assert needle in text and "my-model" in text
    assert server.url in text and f"HTTP {behaviour}" in text
    assert len(server.log) == 1


def test_prose_wrong_count_repair_and_failure(server, tmp_path):
    data = bimi.Dataset("t", [], ["", "Red Lipstick", ""],
                        [[], [["Beauty", "Lips"]], [["Beauty", "Nails"]]])
    client = client_for(server, tmp_path)
    server.script = ["prose"]
    assert len(bimi.llm_interests(client, data, np.array([1, 2]), 3, 20)) == 3
    assert len(server.log) == 1
    server.script = ["wrong_count"]  # one bad reply, then the repair succeeds
    assert len(bimi.llm_interests(client, data, np.array([2, 1]), 3, 20)) == 3
    assert len(server.log) == 3 and "exactly 3" in server.log[2]["body"]["messages"][-1]["content"]
    server.script = ["wrong_count", "wrong_count"]
    with pytest.raises(bimi.ParseError):
        bimi.llm_interests(client, data, np.array([2]), 3, 20)
    assert len(server.log) == 5


def test_cache_makes_second_call_free_and_never_stores_the_key(server, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET-123")
    client = client_for(server, tmp_path)
    first = client.chat(MESSAGES), client.embed(["a", "b", "c"])
    assert server.log[0]["auth"] == "Bearer sk-test-SECRET-123"
    again = client_for(server, tmp_path)
    second = again.chat(MESSAGES), again.embed(["a", "b", "c"])
    assert first[0] == second[0] and np.allclose(first[1], second[1])
    assert len(server.log) == 2 and again.requests == 0 and again.cache_hits == 2
    for folder, _, files in os.walk(tmp_path):
        for f in files:
            assert "SECRET" not in open(os.path.join(folder, f), errors="ignore").read()
    assert "SECRET" not in capsys.readouterr().out


def test_embeddings_are_batched(server, tmp_path):
    vectors = client_for(server, tmp_path, embed_batch=4).embed([f"t{i}" for i in range(10)])
    assert vectors.shape == (10, 16) and len(server.log) == 3
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1)


# --------------------------------------------------------------------- ESIM end to end on synthetic


def esim_configs(synthetic_dir, tmp_path, server=None, **esim):
    cfg = bimi.Config(dataset="synthetic", data_dir=synthetic_dir, out_dir=str(tmp_path / "runs"),
                      max_epochs=2)
    ecfg = bimi.EsimConfig(clusters=10, per_cluster=4, prototypes=8,
                           cache_dir=str(tmp_path / "cache"), retry_wait=0.01, **esim)
    if server:
        ecfg = dataclasses.replace(ecfg, backend="llm", embedder="api", base_url=server.url)
    return cfg, ecfg


def test_esim_categories_hash_outputs(synthetic_dir, tmp_path):
    cfg, ecfg = esim_configs(synthetic_dir, tmp_path)
    out = bimi.run_esim(cfg, ecfg)
    typical = json.load(open(os.path.join(out, "typical_users.json")))
    assert len(typical) == 40 and len({t["user"] for t in typical}) == 40
    assert sorted({t["cluster"] for t in typical}) == list(range(10))
    z = np.load(os.path.join(out, "esim.npz"))
    assert z["semantic"].shape[0] == 40 and z["prototypes"].shape == (8, ecfg.hash_dim)
    labels, labelled = z["labels"], z["labelled"]
    assert labels.min() >= 0 and labels.max() <= 1 and labelled[1:].all() and not labelled[0]
    assert (labels[1:].sum(1) > 0).all()
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["failures"] == 0 and summary["requests"] == 0
    assert bimi.run_esim(cfg, ecfg) == out  # reused


def test_random_typical_users_have_min_len_items_as_the_clustered_do(synthetic_dir, tmp_path):
    cfg, ecfg = esim_configs(synthetic_dir, tmp_path, typical="random")  # 13 % of users are short
    typical = json.load(open(os.path.join(bimi.run_esim(cfg, ecfg), "typical_users.json")))
    assert len({t["user"] for t in typical}) == 40 and min(t["train_items"] for t in typical) >= 5


def test_shuffled_control_keeps_every_statistic_and_cuts_the_link(synthetic_dir, tmp_path):
    cfg, ecfg = esim_configs(synthetic_dir, tmp_path)
    assert "shuffle" not in bimi.identity(ecfg)  # at its default: finished runs keep their folder
    assert bimi.identity(dataclasses.replace(ecfg, shuffle=True))["shuffle"] is True
    real = np.load(os.path.join(bimi.run_esim(cfg, ecfg), "esim.npz"))
    shuffled = dataclasses.replace(ecfg, shuffle=True)
    shuf = np.load(os.path.join(bimi.run_esim(cfg, shuffled), "esim.npz"))
    for key in ("typical_users", "vectors", "prototypes", "labelled"):
        assert np.array_equal(real[key], shuf[key])
    rows = lambda z: [z["semantic"][n].tobytes() + z["semantic_mask"][n].tobytes()
                      for n in range(len(z["semantic"]))]
    r, s = rows(real), rows(shuf)
    assert sorted(r) == sorted(s)  # the same interest sets, each moved to another typical user
    assert sum(a == b for a, b in zip(r, s)) <= sum(r.count(x) > 1 for x in r)  # only twins stay
    pairs = lambda z, rows: sorted(zip(rows, z["semantic_group"].tolist()))
    assert pairs(real, r) == pairs(shuf, s)  # a set keeps its group: twins still no negatives
    users = np.flatnonzero(real["labelled"])
    moved = {}
    for u in users:  # each cluster (its users share one label) moves to another cluster's label
        moved.setdefault(real["labels"][u].tobytes(), set()).add(shuf["labels"][u].tobytes())
    assert all(len(v) == 1 for v in moved.values())
    assert sorted(moved) == sorted(b for v in moved.values() for b in v)
    assert sum(k in v for k, v in moved.items()) == 0


LANGUAGES = {  # 8 interests each, as an LLM asked in that language would name them
    "en": ["Nail polish: gel colours", "Skin care: serums", "Perfume: floral scents",
           "Hair: sprays", "Lipstick: matte shades", "Shaving: razors", "Sun care: sunscreen",
           "Bath: bath bombs"],
    "fr": ["Vernis à ongles: aime les vernis colorés", "Soins: sérums", "Parfum: notes florales",
           "Coiffure: laques", "Rouge à lèvres: teintes mates", "Rasage: rasoirs",
           "Solaire: crèmes", "Bain: bombes de bain"],
    "zh": ["指甲油：喜欢彩色凝胶", "护肤：精华液", "香水：花香", "美发：发胶", "口红：哑光色号",
           "剃须：剃须刀", "防晒：防晒霜", "沐浴：沐浴球"],
    "ja": ["ネイル：カラージェル", "スキンケア：美容液", "香水：フローラル", "ヘア：スプレー",
           "口紅：マット", "シェービング：カミソリ", "日焼け止め：クリーム", "バス：バスボム"],
}


@pytest.mark.parametrize("lang", LANGUAGES)
def test_hash_embedding_reads_every_script(lang, capsys):
    texts = [LANGUAGES[lang][(u + k) % 8] for u in range(8) for k in range(4)]  # 8 users x 4
    vectors = bimi.hash_embed(texts, 256)
    assert (np.abs(vectors).sum(1) > 0).all()
    prototypes, labels, _ = bimi.semantic_labels(vectors, np.repeat(np.arange(8), 4), np.arange(8),
                                                 8, 8, 1, 2)
    assert len(prototypes) == 8 and len(np.unique(labels, axis=0)) == 8
    assert "colorés" in bimi.words(LANGUAGES["fr"][0])
    assert bimi.words("Men's 2in1") == ["men", "s", "2in1"]


def test_an_esim_whose_texts_embed_to_nothing_is_refused(synthetic_dir, tmp_path):
    data = tmp_path / "data" / "synthetic"
    shutil.copytree(os.path.join(synthetic_dir, "synthetic"), data)
    items = [json.loads(line) for line in open(data / "items.jsonl")]
    with open(data / "items.jsonl", "w") as f:
        f.writelines(json.dumps({**it, "categories": [["★★"]]}) + "\n" for it in items)
    cfg, ecfg = esim_configs(str(tmp_path / "data"), tmp_path)
    with pytest.raises(SystemExit, match="embed to nothing"):
        bimi.run_esim(dataclasses.replace(cfg, max_epochs=1), ecfg)


def test_esim_llm_request_counts_cache_and_no_leakage(synthetic_dir, tmp_path, server4, monkeypatch,
                                                      capsys):
    server = server4
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET-456")
    cfg, ecfg = esim_configs(synthetic_dir, tmp_path, server)
    out = bimi.run_esim(cfg, ecfg)
    chats = [r for r in server.log if r["kind"] == "completions"]
    assert len(chats) == ecfg.clusters * ecfg.per_cluster
    n_texts = json.load(open(os.path.join(out, "summary.json")))["texts"]
    assert server.count("embeddings") == -(-n_texts // ecfg.embed_batch)
    # every prompt lists the typical user's training items only, never validation or test items
    data = bimi.load_dataset(synthetic_dir, "synthetic")
    split = bimi.make_split(data, "loo")
    typical = {t["user"] for t in json.load(open(os.path.join(out, "typical_users.json")))}
    prompts = {json.dumps(bimi.render_prompt(data, split.train_seqs[u], 4, 20)): u for u in typical}
    for r in chats:
        u = prompts[json.dumps(r["body"]["messages"])]
        train_texts = {bimi.item_text(data, int(i)) for i in split.train_seqs[u][-20:]}
        prompt = r["body"]["messages"][1]["content"]
        listed = [line.split(". ", 1)[1] for line in prompt.splitlines() if line[:1].isdigit()]
        assert set(listed) == train_texts
        for held_out in data.sequences[u - 1][-2:]:
            assert bimi.item_text(data, int(held_out)) not in listed or \
                bimi.item_text(data, int(held_out)) in train_texts
    # a second ESIM from scratch: every request is a cache hit
    n_before = len(server.log)

    shutil.rmtree(out)
    again = bimi.run_esim(cfg, ecfg)
    assert len(server.log) == n_before
    assert json.load(open(os.path.join(again, "summary.json")))["requests"] == 0
    for folder in (tmp_path / "runs", tmp_path / "cache"):
        for root, _, files in os.walk(folder):
            for f in files:
                assert b"SECRET" not in open(os.path.join(root, f), "rb").read()
    assert "SECRET" not in capsys.readouterr().out


def test_too_many_unparsable_replies_stop_the_run(synthetic_dir, tmp_path, server4):
    server = server4
    cfg, ecfg = esim_configs(synthetic_dir, tmp_path, server)
    server.script = ["wrong_count"] * 40
    with pytest.raises(SystemExit, match="typical users failed"):
        bimi.run_esim(cfg, ecfg)
    out = [d for d in os.listdir(tmp_path / "runs" / "synthetic") if d.startswith("esim-")][0]
    failures = open(tmp_path / "runs" / "synthetic" / out / "failures.jsonl").read().splitlines()
    assert len(failures) > 8


def test_max_failed_lets_a_weak_model_finish_without_its_failed_users(synthetic_dir, tmp_path,
                                                                      server4):
    server = server4
    cfg, ecfg = esim_configs(synthetic_dir, tmp_path, server, max_failed=0.75)
    server.script = ["wrong_count"] * 24  # a request and its repair each: about 12 users fail
    out = bimi.run_esim(cfg, ecfg)
    summary = json.load(open(os.path.join(out, "summary.json")))
    failed = [json.loads(line)["user"] for line in open(os.path.join(out, "failures.jsonl"))]
    kept = [json.loads(line)["user"] for line in open(os.path.join(out, "interests.jsonl"))]
    # the default would have stopped
    assert summary["failures"] == len(failed) > 0.2 * summary["typical_users"]
    assert summary["parsed"] == len(kept) == summary["typical_users"] - len(failed)
    assert not set(failed) & set(kept)


def test_sigkill_mid_run_resumes_without_repeating_finished_requests(synthetic_dir, tmp_path,
                                                                     server4):
    server = server4
    cfg, ecfg = esim_configs(synthetic_dir, tmp_path, server)
    bimi.train(cfg)  # the backbone the subprocess will read
    server.script = ["ok"] * 5 + ["block"]
    cmd = [sys.executable, os.path.join(ROOT, "bimi.py"), "esim", "--dataset", "synthetic",
           "--data_dir", synthetic_dir, "--out_dir", cfg.out_dir, "--max_epochs", "2",
           "--clusters", "10", "--per_cluster", "4", "--prototypes", "8", "--backend", "llm",
           "--embedder", "api", "--base_url", server.url, "--cache_dir", ecfg.cache_dir,
           "--concurrency", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(server.log) < 6 and time.time() < deadline:
        time.sleep(0.05)
    assert len(server.log) == 6  # 5 answered, the 6th is held open
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    server.release.set()
    server.script = []
    bimi.run_esim(cfg, ecfg)
    chats = [r for r in server.log if r["kind"] == "completions"]
    distinct = {json.dumps(r["body"]["messages"]) for r in chats}
    assert server.count("completions") == len(distinct) == 40
