"""
bimi: a minimal, single-file reproduction of EIMF (arXiv 2411.09410), an LLM-enhanced
multi-interest sequential recommender.

Read top to bottom: config, data, k-means, LLM client, ESIM (explicit semantic interests),
encoders (IBIM backbones), losses, evaluation, training, command line.

    python bimi.py train --dataset beauty --model comirec-sa --seed 1
    python bimi.py esim  --dataset beauty --model comirec-sa --backend categories
    python bimi.py train --dataset beauty --model comirec-sa --eimf categories
    python bimi.py reproduce --dataset beauty --seeds 3
"""
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import resource
import string
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np
import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ("mind", "comirec-dr", "comirec-sa", "remi")
PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    """One training run (backbone or EIMF). Every field can be overridden as --key value."""
    # data
    dataset: str = "synthetic"      # folder under data_dir holding sequences.txt and items.jsonl
    data_dir: str = "data"          # processed data root; ../shared/data works too
    protocol: str = "loo"           # "loo" (leave-one-out) or "user" (ComiRec's held-out users)
    split_seed: int = 1230          # ComiRec's preprocessing seed: reproduces its user split exactly
    max_len: int = 20               # history length fed to the encoder (most recent items kept)
    # model
    model: str = "comirec-sa"       # mind | comirec-dr | comirec-sa | remi
    dim: int = 64                   # embedding and interest width d
    interests: int = 4              # K interest vectors per user
    routing_iters: int = 3          # dynamic-routing iterations (mind, comirec-dr)
    rlambda: float = 100.0          # REMI routing regularisation weight (remi only): REMI's code defaults to 0, its README uses 100 at batch 128; the term sums over the batch, so 25 at batch 512 is that weight
    rbeta: float = 0.1              # REMI hard-negative weights exp(rbeta * logit) (remi only): REMI's code defaults to 0 (off), its README uses 10 (Books), 1 (Gowalla), 0.1 (RetailRocket)
    # training
    loss: str = "full"              # "full" softmax over all items, or "sampled" for big catalogues
    negatives: int = 1000           # shared uniform negatives per batch when loss = "sampled"
    batch_size: int = 512           # training examples per step
    lr: float = 0.006               # Adam step size; 6x the usual 1e-3 nears the plateau in 5-6 epochs on Beauty
    max_epochs: int = 7             # time budget (the table's 33 runs took 69 min on 2 cores): ComiRec-SA peaks by then on Beauty; MIND, DR still climb
    patience: int = 2               # epochs without validation gain before stopping
    select_metric: str = "recall@20"  # validation metric for early stopping (or "ndcg@20")
    eval_batch: int = 256           # users scored at once in evaluation (bounds memory; cache-sized is fastest on CPU)
    seed: int = 1                   # initialisation, shuffling and sampling
    device: str = "auto"            # "auto" (CUDA when present), "cpu" or "cuda"
    # EIMF
    eimf: str = ""                  # "" trains the backbone alone; "categories" or "llm": ESIM's backend, whose tasks are added
    lambda_align: float = 0.1       # weight of modality alignment (METHOD.md section 5)
    lambda_pred: float = 0.5        # weight of semantic prediction (tuned on validation only)
    tau: float = 0.1                # InfoNCE temperature of the alignment
    align_batch: int = 64           # typical users drawn for the alignment in each step
    # records
    out_dir: str = "runs"           # where runs/<dataset>/<run>/ is written


@dataclass
class EsimConfig:
    """ESIM, run once per dataset and backbone before EIMF training (METHOD.md section 4)."""
    backend: str = "categories"     # "llm" (OpenAI-compatible endpoint) or "categories" (no LLM)
    embedder: str = "hash"          # "hash" (hashed TF-IDF, offline) or "api" (the endpoint's /embeddings)
    clusters: int = 100             # C behaviour clusters of training users
    per_cluster: int = 4            # M typical users per cluster: C * M LLM requests in all
    min_len: int = 5                # training items a typical user should have
    typical: str = "clustered"      # "clustered" (nearest the centroid) or "random" (ablation)
    semantic_interests: int = 4     # K_s interests asked of the LLM per typical user
    prototypes: int = 32            # P semantic prototypes
    kmeans_restarts: int = 4        # k-means restarts, the lowest inertia is kept
    backbone_seed: int = 1          # seed of the backbone run that ESIM reads
    prompt_items: int = 20          # most recent training items shown in a prompt
    hash_dim: int = 256             # width of the hashed TF-IDF vectors
    base_url: str = ""              # endpoint; empty: $OPENAI_BASE_URL
    embed_base_url: str = ""        # separate endpoint for /embeddings; empty: $OPENAI_EMBED_BASE_URL or base_url
    chat_model: str = ""            # empty: $BIMI_CHAT_MODEL or gpt-4o-mini
    embed_model: str = ""           # empty: $BIMI_EMBED_MODEL or text-embedding-3-small
    temperature: float = 0.0        # sampling temperature of the chat model (0: most repeatable)
    timeout: float = 60.0           # seconds per HTTP request
    max_retries: int = 5            # retries on connection errors, timeouts, 429 and 5xx
    retry_wait: float = 1.0         # seconds before the first retry, doubled each time (with jitter)
    concurrency: int = 4            # requests in flight at once
    embed_batch: int = 64           # texts per /embeddings request
    cache_dir: str = "cache"        # persistent request cache (one file per request)


# Paths and batch sizes that do not change a run's results are left out of its identity.
NOT_IDENTITY = ("data_dir", "out_dir", "device", "eval_batch")
EIMF_FIELDS = ("eimf", "lambda_align", "lambda_pred", "tau", "align_batch")
ESIM_NOT_IDENTITY = ("base_url", "embed_base_url", "timeout", "max_retries", "retry_wait", "concurrency", "cache_dir")


def parse_overrides(args, *configs):
    """Apply `--key value` pairs to the dataclasses; unknown keys and wrong types are errors."""
    if len(args) % 2:
        raise SystemExit(f"error: overrides come in --key value pairs, got {' '.join(args)}")
    fields = {f.name: c for c in configs for f in dataclasses.fields(c)}
    for flag, text in zip(args[::2], args[1::2]):
        key = flag.lstrip("-").replace("-", "_")
        if not flag.startswith("--") or key not in fields:
            raise SystemExit(f"error: unknown option {flag}; valid: " + ", ".join("--" + k for k in fields))
        cfg = fields[key]
        kind = type(getattr(cfg, key))
        try:
            value = kind(text)
        except ValueError:
            raise SystemExit(f"error: --{key} expects {kind.__name__}, got {text!r}") from None
        setattr(cfg, key, value)
    return configs


def identity(cfg):
    """The fields that decide a run's results, hashed into its folder name."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY + ESIM_NOT_IDENTITY}
    if isinstance(cfg, Config) and not cfg.eimf:
        d = {k: v for k, v in d.items() if k not in EIMF_FIELDS}
    return d


def short_hash(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def write_json(path, obj):
    """Atomic: a reader sees the old file or the new one, never half of it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_atomic(state, path):
    """torch.save through a temporary file, so that an interrupt never leaves half a model."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -----------------------------------------------------------------------------
# data


class DataError(Exception):
    """Bad processed data: the message names the file, the line and the fix."""


@dataclass
class Dataset:
    name: str
    sequences: list   # user u (1-based) is sequences[u - 1], an int64 array of item ids, oldest first
    titles: list      # titles[i] for item i; titles[0] is the padding placeholder
    categories: list  # categories[i]: list of category paths (lists of strings)

    @property
    def n_items(self):
        return len(self.titles) - 1


def find_data(data_dir, name):
    folder = os.path.join(data_dir, name)
    if not os.path.exists(os.path.join(folder, "sequences.txt")):
        raise DataError(f"{folder}/sequences.txt not found: run `python data_prep.py {name}` "
                        f"(or pass --data_dir ../shared/data where the benchmark is shared)")
    return folder


def load_dataset(data_dir, name):
    """Read and validate sequences.txt and items.jsonl (format: ../shared/data/README.md)."""
    folder = find_data(data_dir, name)
    items_path, seq_path = os.path.join(folder, "items.jsonl"), os.path.join(folder, "sequences.txt")
    titles, categories = [""], [[]]
    with open(items_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                item = json.loads(line)
                item_id, title, cats = item["item_id"], item["title"], item["categories"]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{items_path}:{line_no}: not an item record ({e}); "
                                "regenerate it with data_prep.py") from None
            if item_id != line_no:
                raise DataError(f"{items_path}:{line_no}: item_id {item_id}, expected {line_no}: "
                                "item ids must be contiguous from 1 in file order; regenerate with data_prep.py")
            titles.append(title)
            categories.append(cats)
    n_items = len(titles) - 1
    sequences = []
    with open(seq_path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                ids = np.array(line.split(), dtype=np.int64)
            except ValueError:
                raise DataError(f"{seq_path}:{line_no}: non-integer token; "
                                "expected `user_id item_id item_id ...`") from None
            if len(ids) < 2:
                raise DataError(f"{seq_path}:{line_no}: user without items; every user needs a sequence")
            if ids[0] != line_no:
                raise DataError(f"{seq_path}:{line_no}: user id {ids[0]}, expected {line_no}: "
                                "user ids must be contiguous from 1 in file order")
            seq = ids[1:]
            if seq.min() < 1 or seq.max() > n_items:
                bad = seq[(seq < 1) | (seq > n_items)][0]
                raise DataError(f"{seq_path}:{line_no}: item {bad} is not in {items_path} "
                                f"(ids 1..{n_items}); the two files are from different runs of data_prep.py")
            sequences.append(seq)
    if not sequences:
        raise DataError(f"{seq_path} is empty; regenerate it with data_prep.py")
    return Dataset(name, sequences, titles, categories)


@dataclass
class EvalSet:
    users: np.ndarray    # (U,) user ids
    hist: np.ndarray     # (U, max_len) last max_len history items, right-padded with 0
    seen: np.ndarray     # (U, S) every history item, masked out of the ranking, 0-padded
    targets: np.ndarray  # (U, T) target items, 0-padded


@dataclass
class Split:
    train_hist: np.ndarray    # (N, max_len) training histories, right-padded with 0
    train_target: np.ndarray  # (N,) the item that follows each history
    train_user: np.ndarray    # (N,) whose example it is
    train_seqs: dict          # user id -> its training sequence (ESIM reads these; never valid/test items)
    valid: EvalSet
    test: EvalSet


def pad_rows(rows, width=None):
    """List of 1-d int arrays -> (len, width) right-padded with 0."""
    width = width or max(1, max(len(r) for r in rows))
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def last_items(rows, max_len):
    return pad_rows([r[-max_len:] for r in rows], max_len)


def training_prefixes(seqs, users, max_len):
    """Every position t >= 1 of each sequence is a target with its preceding (<= max_len) items."""
    lengths = np.array([len(s) for s in seqs])
    flat = np.concatenate(seqs)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    n_targets = lengths - 1
    user = np.repeat(users, n_targets)
    t = np.concatenate([np.arange(1, n) for n in lengths])          # position of each target in its sequence
    target_at = np.repeat(starts, n_targets) + t                    # (N,) index into flat
    n_hist = np.minimum(t, max_len)                                 # (N,) real items in the history
    j = np.arange(max_len)[None, :]                                 # (1, L)
    index = target_at[:, None] - n_hist[:, None] + j                # (N, L) flat index of history slot j
    hist = np.where(j < n_hist[:, None], flat[np.minimum(index, len(flat) - 1)], 0)
    return hist, flat[target_at], user


def eval_set(users, histories, targets, max_len):
    return EvalSet(np.asarray(users, dtype=np.int64), last_items(histories, max_len),
                   pad_rows(histories), pad_rows(targets))


def make_split(data, protocol="loo", max_len=20, split_seed=1230):
    """METHOD.md section 2: leave-one-out, or ComiRec's 8:1:1 split of users."""
    seqs = data.sequences
    if protocol == "loo":
        short = [u for u, s in enumerate(seqs, 1) if len(s) < 3]
        if short:
            raise DataError(f"user {short[0]} has {len(seqs[short[0] - 1])} items: leave-one-out needs at "
                            "least 3 (train, validation, test); use a 3-core (or 5-core) dataset")
        users = np.arange(1, len(seqs) + 1)
        train_seqs = {u: s[:-2] for u, s in enumerate(seqs, 1)}
        valid = eval_set(users, [s[:-2] for s in seqs], [s[-2:-1] for s in seqs], max_len)
        test = eval_set(users, [s[:-1] for s in seqs], [s[-1:] for s in seqs], max_len)
        train_users = users
    elif protocol == "user":
        order = list(range(1, len(seqs) + 1))
        random.Random(split_seed).shuffle(order)
        n1, n2 = int(0.8 * len(order)), int(0.9 * len(order))
        train_users = np.array(sorted(order[:n1]))
        train_seqs = {u: seqs[u - 1] for u in train_users}

        def held_out(users):
            cut = [max(1, int(0.8 * len(seqs[u - 1]))) for u in users]
            return eval_set(users, [seqs[u - 1][:c] for u, c in zip(users, cut)],
                            [seqs[u - 1][c:] for u, c in zip(users, cut)], max_len)
        valid, test = held_out(order[n1:n2]), held_out(order[n2:])
        if not all(len(e.users) and (e.targets > 0).any(1).all() for e in (valid, test)):
            raise DataError("the user split needs validation and test users with at least 2 items each")
    else:
        raise DataError(f"unknown protocol {protocol!r}: use loo or user")
    hist, target, user = training_prefixes([train_seqs[u] for u in train_users], train_users, max_len)
    return Split(hist, target, user, train_seqs, valid, test)


def split_summary(data, split, protocol):
    n_inter = sum(len(s) for s in data.sequences)
    return (f"{data.name}: {len(data.sequences):,} users, {data.n_items:,} items, {n_inter:,} interactions | "
            f"{protocol}: {len(split.train_target):,} training examples from {len(split.train_seqs):,} users, "
            f"{len(split.valid.users):,} validation users, {len(split.test.users):,} test users")


# -----------------------------------------------------------------------------
# k-means (from scratch: k-means++ seeding, Lloyd iterations, restarts)


def assign_points(x, centroids, x_sq, chunk=65536):
    """Nearest centroid and squared distance of every point, one matrix product per chunk of rows
    (bounded memory). x_sq: (n,) squared norms of the points, computed once per k-means run; as it
    is constant along a row it is added after the argmin, to the minimum only."""
    c_sq = (centroids * centroids).sum(1)
    assign = torch.empty(len(x), dtype=torch.long, device=x.device)
    dist = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for start in range(0, len(x), chunk):
        rows = slice(start, min(start + chunk, len(x)))
        partial = torch.addmm(c_sq, x[rows], centroids.T, alpha=-2)  # (chunk, k): |c|^2 - 2<x, c>
        dist[rows], assign[rows] = partial.min(1)
    dist.add_(x_sq).clamp_min_(0)
    return assign, dist


def kmeans_pp(x, k, gen):
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2."""
    x_sq = (x * x).sum(1)
    first = torch.randint(len(x), (1,), generator=gen).item()
    centroids = x[first:first + 1]
    dist = assign_points(x, centroids, x_sq)[1]
    for _ in range(1, k):
        # inverse-CDF draw (first point whose cumulative weight exceeds u): 4x cheaper than torch.multinomial
        cumulative = dist.cpu().double().cumsum(0)
        u = torch.rand(1, dtype=torch.float64, generator=gen) * cumulative[-1]
        pick = (min(int(torch.searchsorted(cumulative, u, right=True)), len(x) - 1) if cumulative[-1] > 0
                else torch.randint(len(x), (1,), generator=gen).item())
        centroids = torch.cat([centroids, x[pick:pick + 1]])
        dist = torch.minimum(dist, assign_points(x, centroids[-1:], x_sq)[1])
    return centroids


def lloyd(x, centroids, max_iter=100, tol=1e-4):
    """Lloyd iterations from given centroids. Returns centroids, assignment, inertia, inertia history."""
    k = len(centroids)
    x_sq = (x * x).sum(1)
    history = []
    min_shift = tol * x.var(0).sum().item()  # converged when centroids move less than this (squared)
    for _ in range(max_iter):
        assign, dist = assign_points(x, centroids, x_sq)
        history.append(dist.sum().item())
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        new = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):  # re-seed empty clusters at the points that are worst served now
            new[empty] = x[dist.topk(len(empty)).indices]
        shift = ((new - centroids) ** 2).sum().item()
        centroids = new
        if shift <= min_shift and not len(empty):
            break
    assign, dist = assign_points(x, centroids, x_sq)
    history.append(dist.sum().item())
    return centroids, assign, history[-1], history


def kmeans(x, k, n_init=4, seed=0, max_iter=100, tol=1e-4):
    """Best of n_init runs (lowest inertia); fully determined by the seed. x: (n, d) float tensor."""
    if len(x) < k:
        raise ValueError(f"k-means needs at least k={k} points, got {len(x)}")
    gen = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n_init):
        result = lloyd(x, kmeans_pp(x, k, gen), max_iter, tol)
        if best is None or result[2] < best[2]:
            best = result
    return best[:3]


# -----------------------------------------------------------------------------
# LLM client (any OpenAI-compatible endpoint, requests only, with a persistent cache)


class LLMError(Exception):
    """A request that cannot succeed by retrying (bad key, unknown model, retries exhausted)."""


class LLMClient:
    def __init__(self, ecfg, log=print):
        self.base = (ecfg.base_url or os.environ.get("OPENAI_BASE_URL", "")).rstrip("/")
        self.embed_base = (ecfg.embed_base_url or os.environ.get("OPENAI_EMBED_BASE_URL", "") or self.base).rstrip("/")
        self.chat_model = ecfg.chat_model or os.environ.get("BIMI_CHAT_MODEL", "gpt-4o-mini")
        self.embed_model = ecfg.embed_model or os.environ.get("BIMI_EMBED_MODEL", "text-embedding-3-small")
        self._key = os.environ.get("OPENAI_API_KEY", "")  # never printed, logged, cached or saved
        self.cfg, self.log = ecfg, log
        self.cache_dir = os.path.join(ecfg.cache_dir, "llm")
        self.requests = self.cache_hits = 0
        self._lock = threading.Lock()
        self._rng = random.Random(0)  # jitter only

    def _post(self, base, path, payload):
        """POST with retries on connection errors, timeouts, 429 and 5xx (honouring Retry-After)."""
        if not base:
            raise LLMError("no endpoint configured: set OPENAI_BASE_URL (e.g. http://localhost:8000/v1) "
                           "or use --backend categories --embedder hash")
        url = base + path
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = "Bearer " + self._key
        model = payload["model"]
        for attempt in range(self.cfg.max_retries + 1):
            wait, problem = None, None
            try:
                with self._lock:
                    self.requests += 1
                r = requests.post(url, json=payload, headers=headers, timeout=self.cfg.timeout)
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError:
                        problem = "reply body is not JSON"
                elif r.status_code == 429 or r.status_code >= 500:
                    problem = f"HTTP {r.status_code}"
                    try:
                        wait = float(r.headers.get("Retry-After", ""))
                    except ValueError:
                        pass
                else:
                    text = r.text[:300].strip().replace(self._key, "***") if self._key else r.text[:300].strip()
                    raise LLMError(f"{url} (model {model}) refused the request: HTTP {r.status_code}: {text}")
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                problem = type(e).__name__
            if attempt == self.cfg.max_retries:
                raise LLMError(f"{url} (model {model}): giving up after {attempt + 1} attempts, last: {problem}")
            if wait is None:
                wait = min(self.cfg.retry_wait * 2.0 ** attempt, 60.0) * (0.5 + self._rng.random())
            self.log(f"  {url}: {problem}, retrying in {wait:.1f} s")
            time.sleep(wait)

    def _cached(self, kind, base, payload, extract):
        key = hashlib.sha256(json.dumps([kind, base, payload], sort_keys=True).encode()).hexdigest()
        path = os.path.join(self.cache_dir, key[:2], key + ".json")
        if os.path.exists(path):
            with open(path) as f:
                with self._lock:
                    self.cache_hits += 1
                return json.load(f)["reply"]
        body = self._post(base, "/" + kind, payload)
        try:
            reply = extract(body)
        except (KeyError, IndexError, TypeError) as e:
            raise LLMError(f"{base}/{kind} (model {payload['model']}) answered in an unexpected shape "
                           f"({type(e).__name__}: {e}); is it OpenAI-compatible?") from None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, {"reply": reply, "model": body.get("model", ""), "kind": kind})
        return reply

    def chat(self, messages):
        payload = {"model": self.chat_model, "messages": messages, "temperature": self.cfg.temperature}
        return self._cached("chat/completions", self.base, payload,
                            lambda body: body["choices"][0]["message"]["content"])

    def embed(self, texts):
        """L2-normalised (len(texts), D) array, sent in batches of embed_batch."""
        def one(batch):
            payload = {"model": self.embed_model, "input": batch}
            return self._cached("embeddings", self.embed_base, payload,
                                lambda body: [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
        batches = [texts[i:i + self.cfg.embed_batch] for i in range(0, len(texts), self.cfg.embed_batch)]
        with concurrent.futures.ThreadPoolExecutor(self.cfg.concurrency) as pool:
            vectors = [v for out in pool.map(one, batches) for v in out]
        if len(vectors) != len(texts):
            raise LLMError(f"{self.embed_base}/embeddings returned {len(vectors)} vectors for {len(texts)} texts")
        return normalize_rows(np.array(vectors, dtype=np.float32))


def normalize_rows(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# -----------------------------------------------------------------------------
# ESIM: typical users, their explicit interests, semantic prototypes and labels


class ParseError(ValueError):
    pass


@functools.lru_cache(maxsize=None)
def load_prompt(name):
    """A template from prompts/, read once per process."""
    with open(os.path.join(PROMPTS, name), encoding="utf-8") as f:
        return string.Template(f.read())


def item_text(data, item):
    """Title and category path; an untitled item is described by its category path alone."""
    path = " > ".join(data.categories[item][0]) if data.categories[item] else "uncategorised"
    title = data.titles[item].strip()
    return f"{title} [{path}]" if title else f"[{path}]"


def render_prompt(data, train_seq, n_interests, max_items):
    """System and user messages for one typical user: training history only, oldest first."""
    shown = train_seq[-max_items:]
    history = "\n".join(f"{n}. {item_text(data, int(i))}" for n, i in enumerate(shown, 1))
    values = {"n_interests": n_interests, "n_items": len(shown), "history": history}
    return [{"role": "system", "content": load_prompt("system.txt").substitute(values)},
            {"role": "user", "content": load_prompt("user.txt").substitute(values)}]


def parse_interests(text, n_interests):
    """Find the JSON object in a reply (code fences or prose around it are fine) and validate it."""
    decoder = json.JSONDecoder()
    found = None
    for start in [m.start() for m in re.finditer(r"\{", text or "")]:
        try:
            obj = decoder.raw_decode(text, start)[0]
        except ValueError:
            continue
        if isinstance(obj, dict) and "interests" in obj:
            found = obj
            break
    if found is None:
        raise ParseError('no JSON object with an "interests" list found in the reply')
    interests = found["interests"]
    if not isinstance(interests, list) or len(interests) != n_interests:
        n = len(interests) if isinstance(interests, list) else "no"
        raise ParseError(f'"interests" must list exactly {n_interests} interests, got {n}')
    out = []
    for k, it in enumerate(interests):
        name = it.get("name") if isinstance(it, dict) else None
        description = it.get("description", "") if isinstance(it, dict) else ""
        if not isinstance(name, str) or not name.strip() or len(name) > 80 or not isinstance(description, str):
            raise ParseError(f"interest {k + 1} needs a non-empty short string name and a string description")
        out.append((name.strip(), description.strip()))
    return out


def llm_interests(client, data, train_seq, n_interests, max_items):
    """One chat request, plus one repair request quoting the parse error; ParseError if both fail."""
    messages = render_prompt(data, train_seq, n_interests, max_items)
    reply = client.chat(messages)
    try:
        return parse_interests(reply, n_interests)
    except ParseError as e:
        repair = load_prompt("repair.txt").substitute(error=str(e), n_interests=n_interests)
        reply = client.chat(messages + [{"role": "assistant", "content": reply or ""},
                                        {"role": "user", "content": repair}])
        return parse_interests(reply, n_interests)


def category_interests(data, train_seq, n_interests):
    """No LLM: the most frequent category paths of the training history, ties to the most recent."""
    count, last = {}, {}
    for pos, item in enumerate(train_seq):
        for path in data.categories[int(item)]:
            key = tuple(path)
            count[key] = count.get(key, 0) + 1
            last[key] = pos
    ranked = sorted(count, key=lambda p: (-count[p], -last[p]))[:n_interests]
    return [(p[-1], " > ".join(p)) for p in ranked]


def hash_embed(texts, dim):
    """Deterministic hashed TF-IDF bag of words (crc32 buckets with a sign bit), L2-normalised."""
    docs = [re.findall(r"[a-z0-9]+", t.lower()) for t in texts]
    df = {}
    for doc in docs:
        for w in set(doc):
            df[w] = df.get(w, 0) + 1
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, doc in enumerate(docs):
        for w in doc:
            h = zlib.crc32(w.encode())
            idf = math.log((1 + len(docs)) / (1 + df[w])) + 1
            out[row, h % dim] += idf if (h >> 31) & 1 else -idf
    return normalize_rows(out)


def select_typical(reps, assign, centroids, lengths, per_cluster, min_len):
    """Per cluster the users nearest the centroid with >= min_len training items, then the longest."""
    dist = (reps - centroids[assign]).norm(dim=1).cpu().numpy()
    assign = assign.cpu().numpy()
    chosen = []  # (row, cluster, distance)
    for c in range(len(centroids)):
        members = np.flatnonzero(assign == c)
        rich = sorted((m for m in members if lengths[m] >= min_len), key=lambda m: dist[m])[:per_cluster]
        rest = sorted((m for m in members if lengths[m] < min_len), key=lambda m: (-lengths[m], dist[m]))
        chosen += [(int(m), c, float(dist[m])) for m in rich + rest[:per_cluster - len(rich)]]
    return chosen


class Progress:
    """One overwriting line: done/total, requests, cache hits, failures, ETA."""

    def __init__(self, total, client=None, every=1.0):
        self.total, self.client, self.every = total, client, every
        self.t0, self.last, self.done, self.failed = time.time(), 0.0, 0, 0

    def step(self, failed=False):
        self.done += 1
        self.failed += failed
        if time.time() - self.last >= self.every or self.done == self.total:
            self.last = time.time()
            rate = self.done / max(self.last - self.t0, 1e-9)
            extra = (f", {self.client.requests} requests, {self.client.cache_hits} cache hits"
                     if self.client else "")
            print(f"\r  {self.done}/{self.total}{extra}, {self.failed} failed, "
                  f"ETA {(self.total - self.done) / rate:.0f} s   ", end="\n" if self.done == self.total else "",
                  flush=True)


@torch.no_grad()
def user_representations(model, split, users, max_len, device):
    """Mean of the backbone's K interests on each user's training history, L2-normalised (n, d)."""
    hist = torch.from_numpy(last_items([split.train_seqs[u] for u in users], max_len))
    reps = [model(hist[i:i + 4096].to(device))[0].mean(1) for i in range(0, len(hist), 4096)]
    return F.normalize(torch.cat(reps), dim=1)


def explicit_interests(data, split, typical, ecfg, client, out):
    """Interests (name, description) of each typical user, or None for a user whose replies could
    not be parsed (written to failures.jsonl). Prompts and interests are saved in `out`."""
    def work(n):
        seq = split.train_seqs[typical[n]["user"]]
        if ecfg.backend == "categories":
            return category_interests(data, seq, ecfg.semantic_interests), None
        try:
            return llm_interests(client, data, seq, ecfg.semantic_interests, ecfg.prompt_items), None
        except ParseError as e:
            return None, str(e)

    if ecfg.backend == "llm":
        with open(os.path.join(out, "prompts.jsonl"), "w") as f:
            for t in typical:
                messages = render_prompt(data, split.train_seqs[t["user"]], ecfg.semantic_interests, ecfg.prompt_items)
                f.write(json.dumps({"user": t["user"], "messages": messages}) + "\n")
    progress = Progress(len(typical), client)
    results, failures = [], []
    with concurrent.futures.ThreadPoolExecutor(ecfg.concurrency if ecfg.backend == "llm" else 1) as pool:
        for t, (interests, error) in zip(typical, pool.map(work, range(len(typical)))):
            results.append(interests)
            if error:
                failures.append({"user": t["user"], "error": error})
            progress.step(failed=bool(error))
    with open(os.path.join(out, "failures.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in failures)
    if len(failures) > 0.2 * len(typical):
        raise SystemExit(f"error: {len(failures)} of {len(typical)} LLM replies could not be parsed "
                         f"(see {out}/failures.jsonl); check the model and prompts/ before spending more")
    with open(os.path.join(out, "interests.jsonl"), "w") as f:
        for t, interests in zip(typical, results):
            if interests:
                f.write(json.dumps({"user": t["user"], "interests": [
                    {"name": a, "description": b} for a, b in interests]}) + "\n")
    return results, failures


def semantic_labels(vectors, owner, clusters_of_typical, assign, n_clusters, n_prototypes, seed, restarts):
    """METHOD.md section 4.6: prototypes by k-means over the interest vectors; a typical user's
    multi-hot label over prototypes; a behaviour cluster's label is the mean over its typical users;
    each user inherits its cluster's. Returns prototypes (P, D), labels (n, P), labelled (n,)."""
    prototypes, text_proto, _ = kmeans(torch.from_numpy(vectors), n_prototypes, restarts, seed=seed)
    multi_hot = np.zeros((len(clusters_of_typical), n_prototypes), dtype=np.float32)
    multi_hot[owner, text_proto.numpy()] = 1
    cluster_label = np.zeros((n_clusters, n_prototypes), dtype=np.float32)
    cluster_count = np.zeros(n_clusters)
    np.add.at(cluster_label, clusters_of_typical, multi_hot)
    np.add.at(cluster_count, clusters_of_typical, 1)
    cluster_label /= np.maximum(cluster_count, 1)[:, None]
    return prototypes.numpy(), cluster_label[assign], cluster_count[assign] > 0


def run_esim(cfg, ecfg, log=print):
    """ESIM for the backbone of `cfg` (its seed replaced by ecfg.backbone_seed); cached by identity."""
    for key, allowed in (("backend", ("llm", "categories")), ("embedder", ("api", "hash")),
                         ("typical", ("clustered", "random"))):
        if getattr(ecfg, key) not in allowed:
            raise SystemExit(f"error: --{key} must be one of {', '.join(allowed)}, got {getattr(ecfg, key)!r}")
    backbone_cfg = dataclasses.replace(cfg, eimf="", seed=ecfg.backbone_seed)
    backbone_dir = train(backbone_cfg, log=log)
    ident = {"backbone": identity(backbone_cfg), "esim": identity(ecfg)}
    out = os.path.join(cfg.out_dir, cfg.dataset,
                       f"esim-{cfg.model}-{cfg.protocol}-{ecfg.backend}-{ecfg.embedder}-{short_hash(ident)}")
    if os.path.exists(os.path.join(out, "summary.json")):
        log(f"reusing ESIM run {out}")
        return out
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "config.json"), ident)
    t0 = time.time()
    data = load_dataset(cfg.data_dir, cfg.dataset)
    split = make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed)
    device = resolve_device(cfg.device)
    model = make_model(backbone_cfg, data.n_items).to(device)
    model.load_state_dict(torch.load(os.path.join(backbone_dir, "model.pt"), map_location=device, weights_only=True))
    model.eval()

    # behaviour clusters and typical users
    users = np.array(sorted(split.train_seqs))
    lengths = np.array([len(split.train_seqs[u]) for u in users])
    reps = user_representations(model, split, users, cfg.max_len, device)
    t1 = time.time()
    centroids, assign, inertia = kmeans(reps, ecfg.clusters, ecfg.kmeans_restarts, seed=ecfg.backbone_seed)
    log(f"k-means: {len(users):,} users into {ecfg.clusters} clusters in {time.time() - t1:.1f} s "
        f"(inertia {inertia:.1f})")
    if ecfg.typical == "clustered":
        chosen = select_typical(reps, assign, centroids, lengths, ecfg.per_cluster, ecfg.min_len)
    else:  # ablation: as many users, drawn at random
        rows = np.random.default_rng(ecfg.backbone_seed).choice(len(users), ecfg.clusters * ecfg.per_cluster,
                                                                 replace=False)
        chosen = [(int(r), int(assign[r]), float("nan")) for r in sorted(rows)]
    typical = [{"user": int(users[r]), "cluster": c, "distance": d, "train_items": int(lengths[r])}
               for r, c, d in chosen]
    write_json(os.path.join(out, "typical_users.json"), typical)

    # their explicit interests, embedded
    client = LLMClient(ecfg, log) if ecfg.backend == "llm" or ecfg.embedder == "api" else None
    log(f"ESIM: {ecfg.backend} interests for {len(typical)} typical users")
    results, failures = explicit_interests(data, split, typical, ecfg, client, out)
    kept = [n for n, r in enumerate(results) if r]
    texts = [f"{name}: {desc}" for n in kept for name, desc in results[n]]
    owner = np.array([row for row, n in enumerate(kept) for _ in results[n]])  # kept-user row of each text
    vectors = client.embed(texts) if ecfg.embedder == "api" else hash_embed(texts, ecfg.hash_dim)

    # semantic prototypes and labels; rows of `labels` are user ids
    prototypes, user_labels, user_labelled = semantic_labels(
        vectors, owner, np.array([typical[n]["cluster"] for n in kept]), assign.cpu().numpy(), ecfg.clusters,
        ecfg.prototypes, ecfg.backbone_seed, ecfg.kmeans_restarts)
    labels = np.zeros((len(data.sequences) + 1, ecfg.prototypes), dtype=np.float32)
    labelled = np.zeros(len(data.sequences) + 1, dtype=bool)
    labels[users], labelled[users] = user_labels, user_labelled
    width = max(len(results[n]) for n in kept)
    semantic = np.zeros((len(kept), width, vectors.shape[1]), dtype=np.float32)  # (typical, K_s, D)
    semantic_mask = np.zeros((len(kept), width), dtype=bool)
    for row in range(len(kept)):
        texts_of_row = vectors[owner == row]
        semantic[row, :len(texts_of_row)] = texts_of_row
        semantic_mask[row, :len(texts_of_row)] = True
    np.savez(os.path.join(out, "esim.npz"), typical_users=np.array([typical[n]["user"] for n in kept]),
             semantic=semantic, semantic_mask=semantic_mask, prototypes=prototypes,
             labels=labels, labelled=labelled, vectors=vectors)
    summary = {"typical_users": len(typical), "parsed": len(kept), "failures": len(failures),
               "texts": len(texts), "text_dim": int(vectors.shape[1]),
               "labelled_users": int(labelled.sum()), "train_users": len(users),
               "mean_label_mass": float(labels[users].sum(1).mean()), "seconds": round(time.time() - t0, 1),
               "requests": client.requests if client else 0, "cache_hits": client.cache_hits if client else 0}
    write_json(os.path.join(out, "summary.json"), summary)
    log(f"ESIM done in {summary['seconds']} s: {summary['parsed']} typical users, {len(texts)} interest texts, "
        f"{summary['labelled_users']:,} labelled users -> {out}")
    return out


# -----------------------------------------------------------------------------
# encoders (IBIM backbones): padded history (B, L) -> K interests (B, K, d) and attention (B, K, L)


def squash(z):
    norm2 = (z * z).sum(-1, keepdim=True)
    return norm2 / (1 + norm2) * z / torch.sqrt(norm2 + 1e-9)


def dynamic_routing(u_hat, logits, mask, iters):
    """Behaviour-to-interest routing. u_hat (B, K, L, d) predictions, logits (B, K, L), mask (B, L).

    Softmax runs over the interests (dim 1), as in ComiRec's TensorFlow code; several PyTorch
    ports softmax over the positions instead. Only the last iteration passes gradients to u_hat."""
    u_hat_fixed = u_hat.detach()
    for it in range(iters):
        last = it == iters - 1
        weights = logits.softmax(1) * mask.unsqueeze(1)         # (B, K, L), padding gets no weight
        source = u_hat if last else u_hat_fixed
        interests = squash((weights.unsqueeze(-1) * source).sum(2))  # (B, K, d)
        if not last:
            logits = logits + (source * interests.unsqueeze(2)).sum(-1)
    return interests, weights


class Encoder(nn.Module):
    """The shared item table; subclasses turn a history into interests."""

    def __init__(self, cfg, n_items):
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        nn.init.normal_(self.items.weight, std=cfg.dim ** -0.5)
        with torch.no_grad():
            self.items.weight[0].zero_()


class MIND(Encoder):
    """One shared bilinear map; routing logits drawn from N(0, 1) (a fixed draw, so that
    evaluation is deterministic; MIND draws per batch)."""

    def __init__(self, cfg, n_items):
        super().__init__(cfg, n_items)
        self.bilinear = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.register_buffer("routing_init", torch.randn(cfg.interests, cfg.max_len))

    def forward(self, hist):
        mask = (hist > 0).float()
        B, L = hist.shape
        u_hat = self.bilinear(self.items(hist)).unsqueeze(1).expand(-1, self.cfg.interests, -1, -1)
        logits = self.routing_init[:, :L].expand(B, -1, -1)
        return dynamic_routing(u_hat, logits, mask, self.cfg.routing_iters)


class ComiRecDR(Encoder):
    """A separate bilinear map per (position, interest); routing logits start at zero."""

    def __init__(self, cfg, n_items):
        super().__init__(cfg, n_items)
        self.bilinear = nn.Parameter(torch.randn(cfg.max_len, cfg.interests, cfg.dim, cfg.dim) * cfg.dim ** -0.5)

    def forward(self, hist):
        mask = (hist > 0).float()
        B, L = hist.shape
        u_hat = torch.einsum("bld,lkde->bkle", self.items(hist), self.bilinear[:L])  # (B, K, L, d)
        logits = torch.zeros(B, self.cfg.interests, L, device=hist.device)
        return dynamic_routing(u_hat, logits, mask, self.cfg.routing_iters)


class ComiRecSA(Encoder):
    """Self-attentive: positions enter the attention only; interests mix the plain item vectors.
    REMI is this encoder trained with REMI's regulariser and negative weighting (see losses)."""

    def __init__(self, cfg, n_items):
        super().__init__(cfg, n_items)
        self.positions = nn.Parameter(torch.randn(cfg.max_len, cfg.dim) * 0.02)
        self.hidden = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.heads = nn.Linear(4 * cfg.dim, cfg.interests)

    def forward(self, hist):
        e = self.items(hist)                                               # (B, L, d)
        scores = self.heads(torch.tanh(self.hidden(e + self.positions[:hist.shape[1]])))  # (B, L, K)
        attention = scores.masked_fill((hist == 0).unsqueeze(-1), -torch.inf).softmax(1).transpose(1, 2)
        return attention @ e, attention                                    # (B, K, d), (B, K, L)


def make_model(cfg, n_items):
    encoders = {"mind": MIND, "comirec-dr": ComiRecDR, "comirec-sa": ComiRecSA, "remi": ComiRecSA}
    if cfg.model not in encoders:
        raise SystemExit(f"error: --model must be one of {', '.join(MODELS)}, got {cfg.model!r}")
    return encoders[cfg.model](cfg, n_items)


# -----------------------------------------------------------------------------
# losses


def hard_readout(interests, target_vecs):
    """Training uses the interest closest to the target: (B, K, d), (B, d) -> (B, d)."""
    best = (interests * target_vecs.unsqueeze(1)).sum(-1).argmax(1)
    return interests[torch.arange(len(interests)), best]


def recommendation_loss(user_vecs, targets, item_table, cfg, gen=None):
    """Softmax cross-entropy of the target, batch mean: over all items ("full") or over shared uniform
    negatives ("sampled"; uniform sampling makes the log-Q correction a constant, which cancels).
    user_vecs (B, d), targets (B,) item ids >= 1, item_table (N + 1, d) with row 0 the padding.

    REMI (model "remi", rbeta > 0) reweights the negatives, as REMI's code does (Tokkiu/REMI,
    src/BasicModel.py, NCELoss.sampled_softmax_loss): with s_j the negatives' logits,
        loss = -s_pos + log(exp(s_pos) + sum_j w_j exp(s_j)),  w_j = exp(rbeta s_j) / mean_j' exp(rbeta s_j'),
    so the weights average 1, the positive keeps weight 1, and gradients flow through the weights.
    The negatives are every other item ("full") or the sampled items other than the target
    ("sampled"). REMI's code reweights only in its sampled softmax (by default 1,280 uniform
    draws over every row, padding included), keeps a drawn target among the negatives, and with
    all items as samples (its sampled_n = 1) always counts the target and the padding row as
    negatives; the kit never does. Raises SystemExit for an unknown cfg.loss."""
    if cfg.loss == "full":
        logits = user_vecs @ item_table[1:].T                              # (B, N): padding is never a candidate
        column = targets - 1
    elif cfg.loss == "sampled":
        negatives = torch.randint(1, len(item_table), (cfg.negatives,), generator=gen).to(targets.device)
        positive = (user_vecs * item_table[targets]).sum(-1, keepdim=True)
        sampled = user_vecs @ item_table[negatives].T
        sampled = sampled.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), -torch.inf)  # accidental hits
        logits = torch.cat([positive, sampled], 1)                         # (B, 1 + negatives)
        column = torch.zeros_like(targets)
    else:
        raise SystemExit(f"error: --loss must be full or sampled, got {cfg.loss!r}")
    if cfg.model == "remi" and cfg.rbeta > 0:
        is_target = torch.arange(logits.shape[1], device=logits.device) == column.unsqueeze(1)  # (B, columns)
        negative = cfg.rbeta * logits.masked_fill(is_target, -torch.inf)   # (B, columns), accidental hits -inf too
        n_neg = torch.isfinite(negative).sum(1, keepdim=True)
        log_w = negative - negative.logsumexp(1, keepdim=True) + n_neg.log()  # log w_j; not detached, as REMI
        logits = logits + log_w.masked_fill(is_target, 0.0)               # exp(s_j) w_j; the positive unweighted
    return F.cross_entropy(logits, column)


def routing_regularizer(attention, dim):
    """REMI's routing regularisation, transcribed from its code (Tokkiu/REMI, src/REMI.py,
    calculate_atten_loss): for each example b and interest k, the squared deviations of the
    attention from its mean over all L positions (padding included, as REMI's code), summed and
    divided by the embedding width d (REMI's diag(C C^T) / hidden_size); squared; summed over the
    interests and over the batch. attention (B, K, L), dim d -> scalar.

    A sum over the batch, not a mean: rlambda's effect grows with the batch size."""
    deviation = attention - attention.mean(2, keepdim=True)               # (B, K, L)
    spread = (deviation ** 2).sum(2) / dim                                 # (B, K)
    return (spread ** 2).sum()


def alignment_loss(interests, semantic, semantic_mask, tau):
    """Late-interaction InfoNCE between typical users' behavioural interests (B, K, d) and their
    projected semantic interests (B, J, d): sim(u, w) = mean_j max_k cos(s_wj, v_uk)."""
    v, s = F.normalize(interests, dim=-1), F.normalize(semantic, dim=-1)
    cos = torch.einsum("ukd,wjd->uwjk", v, s).amax(-1)                     # (B, B, J)
    m = semantic_mask.float().unsqueeze(0)
    sim = (cos * m).sum(-1) / m.sum(-1)                                    # (B users, B semantic owners)
    labels = torch.arange(len(v), device=v.device)
    return (F.cross_entropy(sim / tau, labels) + F.cross_entropy(sim.T / tau, labels)) / 2


def prediction_loss(interests, prototypes, labels, weights):
    """BCE of z_up = max_k <v_uk, P_s p_p> against the soft prototype labels (B, P); weights (B,)
    switch off users whose behaviour cluster kept no typical user."""
    z = torch.einsum("bkd,pd->bkp", interests, prototypes).amax(1)
    per_user = F.binary_cross_entropy_with_logits(z, labels, reduction="none").mean(1)
    return (per_user * weights).sum() / weights.sum().clamp_min(1)


# -----------------------------------------------------------------------------
# evaluation (full ranking, max over interests, history masked)


def mask_seen(scores, seen):
    """-inf on the padding column and on each user's history, in place: scores (B, N + 1), seen (B, S)."""
    scores[:, 0] = -torch.inf
    return scores.scatter_(1, seen, -torch.inf)


@torch.no_grad()
def score_items(model, hist, seen):
    """score(u, i) = max_k <v_uk, e_i>, -inf on padding and on the user's history: (B, N + 1).
    hist (B, L) right-padded history, seen (B, S) items to mask (0-padded).

    Raises ValueError for an empty history (an all-zero row): a user without items has no
    interests (ComiRec-SA's softmax over padding alone is NaN); rank such a user by popularity."""
    empty = (hist == 0).all(1)
    if empty.any():
        raise ValueError(f"{int(empty.sum())} users have an empty history (rows "
                         f"{empty.nonzero()[:5, 0].tolist()}...): the encoders need at least one item")
    interests = model(hist)[0]
    table = model.items.weight
    scores = interests[:, 0] @ table.T
    for k in range(1, interests.shape[1]):
        torch.maximum(scores, interests[:, k] @ table.T, out=scores)
    return mask_seen(scores, seen)


def top_items(scores, n):
    """The n best columns of each row, best first, ties to the lower id: (B, N + 1) -> (B, n).

    topk alone may pick and order tied scores either way. When the (n + 1)-th best score equals
    the n-th (the cut), items tied at the cut were left out, and the row is redone exactly: every
    item above the cut is listed, and the lowest ids among the items at the cut fill the rest.
    A stable sort of the n ids, taken in increasing order, then puts equal scores lower id first."""
    n = min(n, scores.shape[1])
    values, ids = scores.topk(min(n + 1, scores.shape[1]), dim=1)          # (B, n + 1): one more, to see ties
    cut = values[:, n - 1:n]                                                # (B, 1) the n-th best score
    crowded = (values[:, n:] == cut).any(1).nonzero()[:, 0]                 # rows with tied items left out
    ids = ids[:, :n]
    if len(crowded):
        s, c = scores[crowded], cut[crowded]
        above, tied = s > c, s == c
        keep = above | (tied & (tied.cumsum(1, dtype=torch.int32) <= n - above.sum(1, keepdim=True)))  # n per row
        ids[crowded] = keep.nonzero()[:, 1].view(-1, n)
    ids = ids.sort(dim=1).values                                            # increasing ids
    order = scores.gather(1, ids).sort(dim=1, descending=True, stable=True).indices
    return ids.gather(1, order)


@torch.no_grad()
def recommend(model, hist, seen, n):
    """Top-n items per user (ties to the lower id): the whole inference path (no LLM, no text).
    hist (B, L), seen (B, S) -> (B, n) item ids; ValueError for an empty history (score_items)."""
    return top_items(score_items(model, hist, seen), n)


def metrics_from_ranks(ranks, n_targets, cutoffs):
    """Recall, NDCG and HitRate of each user at each cut-off (METHOD.md section 2): ranks (B, T),
    1-based, inf for a target out of the list or padding; n_targets (B,) -> {"recall@20": (B,), ...}."""
    out = {}
    gain = 1 / torch.log2(ranks + 1)                                        # (B, T), 0 for inf
    for n in cutoffs:
        hit = ranks <= n
        ideal = (1 / torch.log2(torch.arange(2, n + 2, device=ranks.device).float())).cumsum(0)
        idcg = ideal[(n_targets.clamp(1, n) - 1)]
        out[f"recall@{n}"] = hit.sum(1) / n_targets
        out[f"ndcg@{n}"] = (hit * gain).sum(1) / idcg
        out[f"hitrate@{n}"] = hit.any(1).float()
    return out


def trim(rows):
    """Drop the all-padding columns on the right of a right-padded (B, W) array (one column at least)."""
    return rows[:, :max(1, int((rows > 0).sum(1).max()))]


@torch.no_grad()
def evaluate_per_user(score, evalset, device, batch=256, cutoffs=(10, 20, 50)):
    """Each user's Recall, NDCG and HitRate at each cut-off (METHOD.md section 2), full ranking:
    {"recall@20": (U,) float64 array, ...} in the order of evalset.users.

    score(hist, seen) -> (B, N + 1) scores, -inf where an item is no candidate (score_items for
    an encoder). A target's rank is its place in the user's top-max(cutoffs) list (top_items: ties
    to the lower id), so a user costs one ranking whatever its number of targets; a target off the
    list, in the history or padding is never a hit. Each batch's seen and targets are cut to its
    own widest row. Memory: a few (batch, N + 1) arrays."""
    n = max(cutoffs)
    parts = []
    for i in range(0, len(evalset.users), batch):
        hist = torch.from_numpy(evalset.hist[i:i + batch]).to(device)
        seen, targets = (torch.from_numpy(trim(a[i:i + batch])).to(device) for a in (evalset.seen, evalset.targets))
        scores = score(hist, seen)
        top = top_items(scores, n)                                              # (B, n)
        listed = torch.isfinite(scores.gather(1, top))                          # (B, n)
        found = (top.unsqueeze(1) == targets.unsqueeze(2)) & listed.unsqueeze(1)  # (B, T, n)
        ranks = torch.where(found.any(2), found.int().argmax(2) + 1.0, torch.inf)  # (B, T)
        parts.append(metrics_from_ranks(ranks, (targets > 0).sum(1), cutoffs))
    return {k: torch.cat([p[k] for p in parts]).double().cpu().numpy() for k in parts[0]}


def evaluate(model, evalset, device, batch=256, cutoffs=(10, 20, 50)):
    """The mean over users of evaluate_per_user for an encoder: {"recall@20": float, ...}."""
    model.eval()
    per_user = evaluate_per_user(functools.partial(score_items, model), evalset, device, batch, cutoffs)
    return {k: float(v.mean()) for k, v in per_user.items()}


def popularity_metrics(split, n_items, cutoffs=(10, 20, 50)):
    """The floor every encoder must beat: rank items by training frequency (ties to the lower id);
    mean metrics over the test users, through evaluate_per_user's loop (one batch at a time)."""
    counts = torch.bincount(torch.from_numpy(np.concatenate(list(split.train_seqs.values()))),
                            minlength=n_items + 1).float()                          # (N + 1,)

    def score(hist, seen):
        return mask_seen(counts.expand(len(hist), -1).clone(), seen)
    per_user = evaluate_per_user(score, split.test, torch.device("cpu"), cutoffs=cutoffs)
    return {k: float(v.mean()) for k, v in per_user.items()}


# -----------------------------------------------------------------------------
# training


def run_dir(cfg, ecfg=None):
    ident = identity(cfg)
    name = f"{cfg.model}-{cfg.protocol}"
    if cfg.eimf:
        ident = {"train": ident, "esim": identity(ecfg)}
        name += f"-eimf-{cfg.eimf}"
    return os.path.join(cfg.out_dir, cfg.dataset, f"{name}-s{cfg.seed}-{short_hash(ident)}")


class Semantics:
    """ESIM's outputs as tensors, plus the text-to-behaviour head P_s (kept beside the model)."""

    def __init__(self, esim_dir, split, cfg, device):
        z = np.load(os.path.join(esim_dir, "esim.npz"))
        t = lambda a: torch.from_numpy(z[a]).to(device)
        self.semantic, self.semantic_mask = t("semantic"), t("semantic_mask")
        self.prototypes, self.labels, self.labelled = t("prototypes"), t("labels"), t("labelled").float()
        self.typical_hist = torch.from_numpy(
            last_items([split.train_seqs[int(u)] for u in z["typical_users"]], cfg.max_len)).to(device)
        self.head = nn.Linear(self.semantic.shape[-1], cfg.dim).to(device)

    def loss(self, model, interests, users, cfg, gen):
        """lambda_align * L_align (a side batch of typical users) + lambda_pred * L_pred (this batch)."""
        pick = torch.randperm(len(self.typical_hist), generator=gen)[:cfg.align_batch].to(users.device)
        typical_interests = model(self.typical_hist[pick])[0]
        align = alignment_loss(typical_interests, self.head(self.semantic[pick]), self.semantic_mask[pick], cfg.tau)
        pred = prediction_loss(interests, self.head(self.prototypes), self.labels[users], self.labelled[users])
        return cfg.lambda_align * align + cfg.lambda_pred * pred


def training_step(model, optimizer, batch, cfg, sampler=None, semantics=None):
    """One Adam step on a batch of (histories, targets, users); returns the loss."""
    h, y, u = batch
    interests, attention = model(h)
    table = model.items.weight
    loss = recommendation_loss(hard_readout(interests, table[y]), y, table, cfg, sampler)
    if cfg.model == "remi":
        loss = loss + cfg.rlambda * routing_regularizer(attention, cfg.dim)
    if semantics:
        loss = loss + semantics.loss(model, interests, u, cfg, sampler)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


class Log:
    def __init__(self, path=None):
        self.path = path

    def __call__(self, msg):
        print(msg, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def train(cfg, ecfg=None, force=False, log=print):
    """Train (or reuse) one run; returns its folder. EIMF runs build their ESIM first."""
    ecfg = dataclasses.replace(ecfg or EsimConfig(), **({"backend": cfg.eimf} if cfg.eimf else {}))
    out = run_dir(cfg, ecfg)
    metrics_path = os.path.join(out, "metrics.json")
    if not force and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            if json.load(f).get("status") == "done":
                log(f"reusing finished run {out}")
                return out
    esim_dir = run_esim(cfg, ecfg, log) if cfg.eimf else None
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "log.txt")):
        os.remove(os.path.join(out, "log.txt"))
    log = Log(os.path.join(out, "log.txt"))
    saved = {"config": dataclasses.asdict(cfg), "esim": dataclasses.asdict(ecfg) if cfg.eimf else None,
             "esim_dir": esim_dir}
    write_json(os.path.join(out, "config.json"), saved)
    device = resolve_device(cfg.device)
    t0 = time.time()
    data = load_dataset(cfg.data_dir, cfg.dataset)
    split = make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed)
    log(split_summary(data, split, cfg.protocol))
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, data.n_items).to(device)
    semantics = Semantics(esim_dir, split, cfg, device) if cfg.eimf else None
    params = list(model.parameters()) + (list(semantics.head.parameters()) if semantics else [])
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    shuffle = torch.Generator().manual_seed(cfg.seed)   # batch order
    sampler = torch.Generator().manual_seed(cfg.seed + 1)  # negatives and typical-user batches
    hist, target, user = (torch.from_numpy(a) for a in (split.train_hist, split.train_target, split.train_user))
    record = {"status": "running", "epochs": [], "best_epoch": 0, "valid": None, "test": None}
    best, best_state, bad_epochs = -1.0, None, 0
    log(f"training {cfg.model}{' + EIMF (' + cfg.eimf + ')' if cfg.eimf else ''} on {device}: "
        f"{sum(p.numel() for p in model.parameters()):,} parameters -> {out}")
    try:
        for epoch in range(1, cfg.max_epochs + 1):
            model.train()
            t_epoch, total, steps = time.time(), 0.0, 0
            order = torch.randperm(len(target), generator=shuffle)
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                batch = hist[idx].to(device), target[idx].to(device), user[idx].to(device)
                total += training_step(model, optimizer, batch, cfg, sampler, semantics)
                steps += 1
            train_s = time.time() - t_epoch
            valid = evaluate(model, split.valid, device, cfg.eval_batch)
            score = valid[cfg.select_metric]
            record["epochs"].append({"epoch": epoch, "loss": total / steps, "train_s": round(train_s, 2),
                                     "eval_s": round(time.time() - t_epoch - train_s, 2), "valid": valid})
            improved = score > best
            if improved:
                best, bad_epochs, record["best_epoch"], record["valid"] = score, 0, epoch, valid
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                save_atomic(best_state, os.path.join(out, "model.pt"))
                if semantics:
                    save_atomic(semantics.head.state_dict(), os.path.join(out, "heads.pt"))
            else:
                bad_epochs += 1
            write_json(metrics_path, record)
            log(f"epoch {epoch:3d} | loss {total / steps:.4f} | valid {cfg.select_metric} {score:.4f}"
                f"{' *' if improved else '  '} | ndcg@20 {valid['ndcg@20']:.4f} | {train_s:.1f} s train, "
                f"{time.time() - t_epoch - train_s:.1f} s eval")
            if bad_epochs >= cfg.patience:
                break
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        write_json(metrics_path, record)
        log(f"interrupted: {len(record['epochs'])} epochs recorded in {metrics_path}; the best model so far "
            f"is {out}/model.pt; run again to restart this run")
        raise
    model.load_state_dict(best_state)
    t_test = time.time()
    record["test"] = evaluate(model, split.test, device, cfg.eval_batch)
    record.update(status="done", test_s=round(time.time() - t_test, 2), total_s=round(time.time() - t0, 1),
                  device=str(device))
    write_json(metrics_path, record)
    t = record["test"]
    log(f"test (epoch {record['best_epoch']}): recall@20 {t['recall@20']:.4f} ndcg@20 {t['ndcg@20']:.4f} "
        f"recall@50 {t['recall@50']:.4f} ndcg@50 {t['ndcg@50']:.4f} | {record['total_s']} s in all")
    return out


# -----------------------------------------------------------------------------
# command line


def bench_one(cfg, steps=0):
    """One encoder at the dataset's scale, one JSON line: seconds per training step over the first
    `steps` steps of an epoch (0: the whole epoch; epoch_s extrapolates a slice), test users ranked
    against the full catalogue per second (every test user), and the peak resident memory of this
    process in MB (with the device's peak allocation on CUDA)."""
    device = resolve_device(cfg.device)
    t0 = time.time()
    data = load_dataset(cfg.data_dir, cfg.dataset)
    split = make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed)
    load_s = time.time() - t0
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, data.n_items).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    arrays = [torch.from_numpy(a) for a in (split.train_hist, split.train_target, split.train_user)]
    epoch_steps = math.ceil(len(arrays[1]) / cfg.batch_size)
    steps = min(steps, epoch_steps) if steps > 0 else epoch_steps
    model.train()
    t0 = time.time()
    for start in range(0, steps * cfg.batch_size, cfg.batch_size):
        training_step(model, optimizer, [a[start:start + cfg.batch_size].to(device) for a in arrays], cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.time() - t0) / steps
    t0 = time.time()
    evaluate(model, split.test, device, cfg.eval_batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    eval_s = time.time() - t0
    record = {"model": cfg.model, "items": data.n_items, "users": len(data.sequences), "protocol": cfg.protocol,
              "loss": cfg.loss, "load_split_s": round(load_s, 2), "steps": steps, "step_s": round(step_s, 4),
              "epoch_steps": epoch_steps, "epoch_s": round(step_s * epoch_steps, 1), "eval_s": round(eval_s, 2),
              "test_users": len(split.test.users), "users_per_s": round(len(split.test.users) / eval_s),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        record["device_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
    print(json.dumps(record), flush=True)


def bench_kmeans(cfg, ecfg):
    """k-means on the dataset's real user count: n_users x dim points into C clusters."""
    data = load_dataset(cfg.data_dir, cfg.dataset)
    x = F.normalize(torch.randn(len(data.sequences), cfg.dim, generator=torch.Generator().manual_seed(0)), dim=1)
    t0 = time.time()
    kmeans(x, ecfg.clusters, ecfg.kmeans_restarts, seed=0)
    print(json.dumps({"kmeans_points": len(x), "dim": cfg.dim, "clusters": ecfg.clusters,
                      "restarts": ecfg.kmeans_restarts, "seconds": round(time.time() - t0, 2)}), flush=True)


ROWS = [  # (row label, model, EIMF on?, config overrides, ESIM overrides): METHOD.md section 6
    *[(m, m, False, {}, {}) for m in MODELS],
    *[(f"{m} + EIMF", m, True, {}, {}) for m in MODELS],
    ("comirec-sa + EIMF w/o alignment", "comirec-sa", True, {"lambda_align": 0.0}, {}),
    ("comirec-sa + EIMF w/o prediction", "comirec-sa", True, {"lambda_pred": 0.0}, {}),
    ("comirec-sa + EIMF, random users", "comirec-sa", True, {}, {"typical": "random"}),
    ("comirec-sa + EIMF, categories backend", "comirec-sa", True, {}, {"backend": "categories", "embedder": "hash"}),
]
TABLE_METRICS = ("recall@20", "ndcg@20", "hitrate@20", "recall@50", "ndcg@50", "hitrate@50")


def reproduce(cfg, ecfg, seeds):
    """Train every row of the table for seeds 1..seeds (finished runs are reused), then write it."""
    t0 = time.time()
    runs = {label: [] for label, *_ in ROWS}
    for seed in range(1, seeds + 1):  # seed-major: a whole first table appears early
        for label, model, eimf, overrides, esim_overrides in ROWS:
            e = dataclasses.replace(ecfg, **esim_overrides)
            c = dataclasses.replace(cfg, model=model, seed=seed, eimf=e.backend if eimf else "", **overrides)
            print(f"== {label}, seed {seed}", flush=True)
            runs[label].append(train(c, e))
    results = []
    for label, model, eimf, overrides, esim_overrides in ROWS:
        backend = dataclasses.replace(ecfg, **esim_overrides).backend if eimf else ""
        tests = []
        for r in runs[label]:
            with open(os.path.join(r, "metrics.json")) as f:
                tests.append(json.load(f)["test"])
        # sample std (n - 1): numpy's default (n) would shrink the seed spread by 18 % at 3 seeds
        stats = {m: (float(np.mean([t[m] for t in tests])),
                     float(np.std([t[m] for t in tests], ddof=1)) if len(tests) > 1 else 0.0)
                 for m in TABLE_METRICS}
        results.append({"row": label, "model": model, "eimf": eimf, "backend": backend, "runs": runs[label],
                        "tests": tests, "mean_std": stats})
    data = load_dataset(cfg.data_dir, cfg.dataset)
    popularity = popularity_metrics(make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed), data.n_items)
    backbone = {r["model"]: r for r in results if not r["eimf"]}
    for r in results:
        if r["eimf"]:
            base = backbone[r["model"]]["mean_std"]
            r["gain_pct"] = {m: 100 * (r["mean_std"][m][0] / base[m][0] - 1) if base[m][0] else None
                             for m in ("recall@20", "ndcg@20")}
            # the same seed starts backbone and EIMF from the same encoder and batch order: paired gains
            r["gain_per_seed_pct"] = {m: [100 * (e[m] / b[m] - 1) if b[m] else None
                                          for b, e in zip(backbone[r["model"]]["tests"], r["tests"])]
                                      for m in ("recall@20", "ndcg@20")}
    meta = {"dataset": cfg.dataset, "protocol": cfg.protocol, "seeds": seeds, "backend": ecfg.backend,
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
                       f"{'CUDA ' + torch.cuda.get_device_name() if resolve_device(cfg.device).type == 'cuda' else 'CPU'}",
            "date": time.strftime("%Y-%m-%d"), "total_s": round(time.time() - t0, 1)}
    os.makedirs("results", exist_ok=True)
    write_json(os.path.join("results", f"{cfg.dataset}.json"), {"meta": meta, "rows": results,
                                                                 "popularity": popularity})
    lines = [f"{cfg.dataset}, protocol {cfg.protocol}, full ranking, test split, mean ± sample std over seeds 1-{seeds}; "
             f"EIMF backend: {ecfg.backend}" + (" (no LLM: category paths)" if ecfg.backend == "categories" else ""),
             "", "| row | " + " | ".join(TABLE_METRICS) + " | gain R@20 / N@20 |",
             "|---" * (len(TABLE_METRICS) + 2) + "|"]
    for r in results:
        cells = [f"{m:.4f} ± {s:.4f}" for m, s in (r["mean_std"][k] for k in TABLE_METRICS)]
        gain = (f"{r['gain_pct']['recall@20']:+.1f}% / {r['gain_pct']['ndcg@20']:+.1f}%" if r.get("gain_pct") else "")
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {gain} |")
    lines.append("| popularity (reference floor) | " + " | ".join(f"{popularity[k]:.4f}" for k in TABLE_METRICS) + " | |")
    lines += ["", f"{meta['machine']}; {meta['date']}; {meta['total_s']:.0f} s for this invocation."]
    with open(os.path.join("results", f"{cfg.dataset}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


USAGE = """usage: python bimi.py COMMAND [--key value ...]

commands:
  info       load the dataset, build the split and print a summary
  train      train one run (backbone, or EIMF with --eimf categories|llm)
  esim       run ESIM for a trained backbone (--model, --backend, --embedder ...)
  bench      per encoder: seconds per training step (--bench_steps N: the first N steps of an epoch;
             default the whole epoch), test users ranked per second, peak memory; and k-means
  reproduce  every row of the results table over --seeds N (default 3)

Every field of Config and EsimConfig is an option (see the top of bimi.py), e.g.
  python bimi.py train --dataset beauty --model comirec-sa --seed 1 --lr 0.003
"""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, args = argv[0], argv[1:]
    extra = {}
    for flag in ("--force", "--seeds", "--bench_steps"):  # command options that are not config fields; the last one wins
        while flag in args:
            i = args.index(flag)
            extra[flag] = True if flag == "--force" else int(args[i + 1])
            del args[i:i + (1 if flag == "--force" else 2)]
    cfg, ecfg = parse_overrides(args, Config(), EsimConfig())
    try:
        if command == "info":
            data = load_dataset(cfg.data_dir, cfg.dataset)
            print(split_summary(data, make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed), cfg.protocol))
        elif command == "train":
            train(cfg, ecfg, force=extra.get("--force", False))
        elif command == "esim":
            run_esim(cfg, ecfg)
        elif command == "bench":
            steps = str(extra.get("--bench_steps", 0))
            for model in MODELS:  # one process each: its own peak memory
                subprocess.run([sys.executable, os.path.abspath(__file__), "_bench_one", *args, "--model", model,
                                "--bench_steps", steps], check=True)
            bench_kmeans(cfg, ecfg)
        elif command == "_bench_one":
            bench_one(cfg, extra.get("--bench_steps", 0))
        elif command == "reproduce":
            reproduce(cfg, ecfg, extra.get("--seeds", 3))
        else:
            raise SystemExit(f"error: unknown command {command!r}\n\n{USAGE}")
    except (DataError, LLMError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("interrupted")


if __name__ == "__main__":
    main()
