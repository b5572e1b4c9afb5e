"""
bimi: a minimal, single-file reproduction of EIMF (arXiv 2411.09410), an LLM-enhanced
multi-interest sequential recommender. The README's "Method" section is the written method.
Read top to bottom: config, data and splits, encoders, losses, evaluation, k-means, ESIM,
training; then the plumbing: LLM client, run records, tables, command line.

    .venv/bin/python bimi.py train --dataset beauty --model comirec-sa --eimf categories
    .venv/bin/python bimi.py reproduce --dataset beauty --seeds 3
"""
import base64
import concurrent.futures
import contextlib
import dataclasses
import difflib
import email.utils
import fcntl
import functools
import hashlib
import inspect
import io
import json
import math
import multiprocessing
import os
import platform
import random
import re
import resource
import shlex
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
    """One training run (backbone or EIMF). Every field is an option: --key value or --key=value."""
    # data
    dataset: str = "synthetic"      # folder under data_dir with sequences.txt and items.jsonl
    data_dir: str = "data"          # root of the processed datasets
    protocol: str = "loo"           # "loo" (leave-one-out) or "user" (ComiRec's held-out users)
    split_seed: int = 1230          # ComiRec's preprocessing seed: its user split exactly
    max_len: int = 20               # history length fed to the encoder (most recent kept)
    # model
    model: str = "comirec-sa"       # mind | comirec-dr | comirec-sa | remi
    dim: int = 64                   # embedding and interest width d
    interests: int = 4              # K interest vectors per user
    routing_iters: int = 3          # dynamic-routing iterations (mind, comirec-dr)
    rlambda: float = 25.0           # REMI's routing regulariser weight (remi only)
    rbeta: float = 0.1              # REMI's hard-negative weights exp(rbeta * logit) (remi only)
    # training
    loss: str = "full"              # "full" softmax over all items, or "sampled"
    negatives: int = 1000           # shared uniform negatives per batch when loss = "sampled"
    batch_size: int = 512           # training examples per step
    lr: float = 0.006               # Adam step size, every encoder
    max_epochs: int = 50            # a guard only: runs stop by patience
    patience: int = 2               # epochs without validation gain before stopping
    select_metric: str = "recall@20"  # validation metric for early stopping
    eval_batch: int = 256           # users scored at once in evaluation (bounds memory)
    seed: int = 1                   # initialisation, shuffling and sampling
    device: str = "auto"            # "auto" (CUDA when present), "cpu" or "cuda"
    # EIMF
    eimf: str = ""                  # "": the backbone alone; "categories" or "llm": ESIM's backend
    lambda_align: float = 0.1       # weight of modality alignment
    lambda_pred: float = 0.5        # weight of semantic prediction
    tau: float = 0.1                # InfoNCE temperature of the alignment
    align_batch: int = 64           # typical users drawn for the alignment in each step
    # records
    out_dir: str = "runs"           # runs are written to out_dir/<dataset>/<run>/

@dataclass
class EsimConfig:
    """ESIM, run once per dataset and backbone before EIMF training."""
    backend: str = "categories"     # "llm" (OpenAI-compatible endpoint) or "categories" (no LLM)
    embedder: str = "hash"          # "hash" (hashed TF-IDF, offline) or "api" (/embeddings)
    clusters: int = 100             # C behaviour clusters of training users
    per_cluster: int = 4            # M typical users per cluster: C * M LLM requests in all
    min_len: int = 5                # training items a typical user should have
    typical: str = "clustered"      # "clustered" (nearest the centroid) or "random" (ablation)
    shuffle: bool = False           # control: interest sets and cluster labels permuted among users
    semantic_interests: int = 4     # K_s interests asked of the LLM per typical user
    prototypes: int = 32            # P semantic prototypes
    kmeans_restarts: int = 4        # k-means restarts; the lowest inertia is kept
    esim_seed: int = 0              # backbone seed ESIM reads: 0 = the run's own; n = seed n's
    prompt_items: int = 20          # most recent training items shown in a prompt
    hash_dim: int = 256             # width of the hashed TF-IDF vectors
    base_url: str = ""              # e.g. http://localhost:8000/v1; empty: $OPENAI_BASE_URL
    embed_base_url: str = ""        # for /embeddings; empty: $OPENAI_EMBED_BASE_URL or base_url
    chat_model: str = ""            # empty: $BIMI_CHAT_MODEL or gpt-4o-mini
    embed_model: str = ""           # empty: $BIMI_EMBED_MODEL or text-embedding-3-small
    temperature: float = 0.0        # chat sampling temperature (0: most repeatable)
    max_tokens: int = 400           # reply length cap per chat request
    timeout: float = 120.0          # seconds per HTTP request; a timed-out prompt is not re-sent
    max_retries: int = 8            # retries on connection errors, 408, 409, 429 and 5xx (~3 min)
    retry_wait: float = 1.0         # seconds before the first retry, doubled each time
    concurrency: int = 4            # requests in flight at once
    max_failed: float = 0.2         # share (0-1) of typical users that may fail before ESIM stops
    embed_batch: int = 64           # texts per /embeddings request
    cache_dir: str = "cache"        # persistent request cache (one file per request)

@dataclass
class CommandOptions:
    """Options of a command, not of a run (never part of a run's identity)."""
    force: bool = False             # train, esim: make it again even if a finished one exists
    seeds: int = 3                  # reproduce: seeds 1..N of every row
    models: str = "mind,comirec-dr,comirec-sa,remi"  # reproduce: backbones, comma-separated
    ablations: int = 1              # reproduce: 0 leaves out the ComiRec-SA ablation rows
    bench_steps: int = 0            # bench: training steps timed per encoder (0: a whole epoch)
    jobs: int = 0                   # reproduce: runs in parallel, a thread each (0: one per core)
    plan: bool = False              # reproduce: print every run as one command; train nothing

def log(msg):
    """Print a line, and append it to the log.txt of the stage being made (log.path)."""
    print(msg, flush=True)
    if log.path:
        with open(log.path, "a") as f:
            f.write(msg + "\n")
log.path = None

# -----------------------------------------------------------------------------
# data and splits (README: Protocol)

class DataError(Exception):
    """Bad processed data: the message names the file, the line and the fix."""

@dataclass
class Dataset:
    name: str
    sequences: list   # user u (1-based) is sequences[u - 1], int64 item ids, oldest first
    titles: list      # titles[i] of item i; titles[0] is the padding placeholder
    categories: list  # categories[i]: list of category paths (lists of strings)
    repeating: int = 0  # sequences in which some item occurs more than once

    @property
    def n_items(self):
        return len(self.titles) - 1

def find_data(data_dir, name):
    """<data_dir>/<name>; DataError naming the first missing file and how to make both."""
    folder = os.path.join(data_dir, name)
    for file in ("sequences.txt", "items.jsonl"):
        if not os.path.exists(os.path.join(folder, file)):
            import data_prep  # which datasets it can make
            raise DataError(f"{folder}/{file} not found: " + (
                f"run `.venv/bin/python data_prep.py {name}`, which writes sequences.txt and "
                "items.jsonl" if name in data_prep.DATASETS else "write sequences.txt and "
                "items.jsonl there (README: Your own dataset)") + " (or point --data_dir at a "
                "folder that holds the processed datasets)")
    return folder

def read_text_lines(path):
    """A UTF-8 file's lines, without a byte-order mark or trailing blank lines (a blank line in
    the middle stays, for the caller to name); DataError if it is not UTF-8."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read().rstrip()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); save it as UTF-8 ({REMAKE})") from None
    return text.split("\n") if text else []

REMAKE = "or remake it with data_prep.py if it made the file"
CATEGORIES = 'a list of category paths, each a list of strings, e.g. [["Beauty", "Nails"]]'

def load_dataset(data_dir, name):
    """Read and check sequences.txt and items.jsonl (README: Your own dataset); DataError names
    the file and line of anything malformed."""
    folder = find_data(data_dir, name)
    items, seqs = os.path.join(folder, "items.jsonl"), os.path.join(folder, "sequences.txt")
    titles, categories, sequences = [""], [[]], []
    for n, line in enumerate(read_text_lines(items), 1):
        try:
            item = json.loads(line)
            item_id, title, cats = item["item_id"], item["title"], item["categories"]
        except (ValueError, KeyError, TypeError) as e:
            example = '{"item_id": 1, "title": "...", "categories": [["..."]]}'
            raise DataError(f"{items}:{n}: " + (f"not an item record ({e}): expected {example}"
                            if line.strip() else "blank line; remove it (one item per line)")) \
                from None
        if type(item_id) is not int or item_id != n:
            raise DataError(f"{items}:{n}: item_id {json.dumps(item_id)}, expected {n}: item ids "
                            f"must be contiguous from 1 in file order; fix it ({REMAKE})")
        if not isinstance(title, str):
            raise DataError(f"{items}:{n}: title is {json.dumps(title)}, expected a string "
                            '("" for an untitled item)')
        if not isinstance(cats, list) or not all(isinstance(p, list) and p and all(
                isinstance(c, str) for c in p) for p in cats):
            raise DataError(f"{items}:{n}: categories is {json.dumps(cats)[:80]}, expected "
                            f"{CATEGORIES} ([] for none)")
        titles.append(title)
        categories.append(cats)
    for n, line in enumerate(read_text_lines(seqs), 1):
        try:
            ids = np.array(line.split(), dtype=np.int64)
        except ValueError:
            token = next(t for t in line.split() if not re.fullmatch(r"[0-9]+", t))
            raise DataError(f"{seqs}:{n}: non-integer token {token!r}; expected `user_id "
                            "item_id item_id ...`") from None
        bad = ids[1:][(ids[1:] < 1) | (ids[1:] >= len(titles))]
        problem = ("blank line; remove it (one user per line)" if not len(ids) else
                   "user without items; every user needs a sequence" if len(ids) < 2 else
                   f"user id {ids[0]}, expected {n}: user ids must be contiguous from 1 in file "
                   "order" if ids[0] != n else f"item {bad[0]} is not in {items} (ids "
                   f"1..{len(titles) - 1}): the two files do not belong together"
                   if len(bad) else "")
        if problem:
            raise DataError(f"{seqs}:{n}: {problem}")
        sequences.append(ids[1:])
    if not sequences:
        raise DataError(f"{seqs} is empty: one line per user, `user_id item_id ...`")
    # users who repeat an item: one sort of (user, item) keys (np.unique per user is 5x slower)
    owner = np.repeat(np.arange(len(sequences)), [len(q) for q in sequences])
    keys = np.sort(owner * len(titles) + np.concatenate(sequences))
    repeating = len(np.unique(keys[1:][keys[1:] == keys[:-1]] // len(titles)))
    return Dataset(name, sequences, titles, categories, repeating)

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
    train_seqs: dict          # user id -> its training sequence (never validation/test items)
    valid: EvalSet
    test: EvalSet

def pad_rows(rows, width=None):
    """List of 1-d int arrays -> (len, width) right-padded with 0."""
    out = np.zeros((len(rows), width or max(1, max(len(r) for r in rows))), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out

def last_items(rows, max_len):
    return pad_rows([r[-max_len:] for r in rows], max_len)

def eval_set(users, histories, targets, max_len):
    return EvalSet(np.asarray(users, dtype=np.int64), last_items(histories, max_len),
                   pad_rows(histories), pad_rows(targets))

def training_prefixes(seqs, users, max_len):
    """Every position t >= 1 of each sequence is a target with its preceding (<= max_len) items."""
    lengths = np.array([len(s) for s in seqs])
    flat, starts = np.concatenate(seqs), np.concatenate([[0], np.cumsum(lengths)[:-1]])
    t = np.concatenate([np.arange(1, n) for n in lengths])    # each target's place in its sequence
    target_at = np.repeat(starts, lengths - 1) + t            # (N,) index into flat
    n_hist = np.minimum(t, max_len)                           # (N,) real items in the history
    j = np.arange(max_len)[None, :]                           # (1, L)
    index = target_at[:, None] - n_hist[:, None] + j          # (N, L) flat index of slot j
    hist = np.where(j < n_hist[:, None], flat[np.minimum(index, len(flat) - 1)], 0)
    return hist, flat[target_at], np.repeat(users, lengths - 1)

def make_split(data, protocol="loo", max_len=20, split_seed=1230):
    """Leave-one-out, or ComiRec's 8:1:1 split of users (README: Protocol)."""
    seqs = data.sequences
    if protocol == "loo":
        short = [u for u, s in enumerate(seqs, 1) if len(s) < 3]
        if short:
            raise DataError(f"user {short[0]} has {len(seqs[short[0] - 1])} items: leave-one-out "
                            "needs at least 3 (train, validation, test); use a 3-core (or 5-core) "
                            "dataset")
        train_users = np.arange(1, len(seqs) + 1)
        train_seqs = {u: s[:-2] for u, s in enumerate(seqs, 1)}
        valid = eval_set(train_users, [s[:-2] for s in seqs], [s[-2:-1] for s in seqs], max_len)
        test = eval_set(train_users, [s[:-1] for s in seqs], [s[-1:] for s in seqs], max_len)
    else:
        order = list(range(1, len(seqs) + 1))
        random.Random(split_seed).shuffle(order)
        n1, n2 = int(0.8 * len(order)), int(0.9 * len(order))
        train_users = np.array(sorted(order[:n1]))
        train_seqs = {u: seqs[u - 1] for u in train_users}
        cut = {u: max(1, int(0.8 * len(seqs[u - 1]))) for u in order}  # history: the first 80 %
        targets = lambda u: list(dict.fromkeys(seqs[u - 1][cut[u]:].tolist()))  # an item once
        valid, test = (eval_set(users, [seqs[u - 1][:cut[u]] for u in users], [targets(u)
                       for u in users], max_len) for users in (order[n1:n2], order[n2:]))
        if not all(len(e.users) and (e.targets > 0).any(1).all() for e in (valid, test)):
            raise DataError("the user split needs validation and test users with at least 2 "
                            "items each")
    hist, target, user = training_prefixes([train_seqs[u] for u in train_users], train_users,
                                           max_len)
    return Split(hist, target, user, train_seqs, valid, test)

def split_summary(data, split, protocol):
    return (f"{data.name}: {len(data.sequences):,} users, {data.n_items:,} items, "
            f"{sum(len(s) for s in data.sequences):,} interactions | {protocol}: "
            f"{len(split.train_target):,} training examples from {len(split.train_seqs):,} users, "
            f"{len(split.valid.users):,} validation users, {len(split.test.users):,} test users")

def repeat_summary(data, split):
    """Counts validation and test targets already in the user's history, with one warning line if
    any: masked with the history, no model can hit them (6.7 % of Yelp's loo test targets)."""
    counts = {"repeating_sequences": data.repeating}
    for part in ("valid", "test"):  # one sorted membership test of (row, item) keys
        e = getattr(split, part)
        row, real = np.arange(len(e.users))[:, None] * (data.n_items + 1), e.targets > 0
        counts[f"{part}_in_history"] = int(np.isin((row + e.targets)[real],
                                                   (row + e.seen)[e.seen > 0]).sum())
        counts[f"{part}_targets"] = int(real.sum())
    valid_hits, valid_n, test_hits, test_n = list(counts.values())[1:]
    if data.repeating or valid_hits or test_hits:
        log(f"WARNING: {data.name}: {data.repeating:,} of {len(data.sequences):,} sequences repeat "
            f"an item; {valid_hits:,} of {valid_n:,} validation targets "
            f"({100 * valid_hits / valid_n:.1f} %) and {test_hits:,} of {test_n:,} test targets "
            f"({100 * test_hits / test_n:.1f} %) are already in the user's history, which is "
            "masked from the ranking, so no model can hit them")
    return counts

# -----------------------------------------------------------------------------
# encoders (README: Encoders): history (B, L) -> interests (B, K, d), attention (B, K, L)

def squash(z):
    norm2 = (z * z).sum(-1, keepdim=True)
    return norm2 / (1 + norm2) * z / torch.sqrt(norm2 + 1e-9)

def dynamic_routing(u_hat, logits, mask, iters):
    """Behaviour-to-interest routing: u_hat (B, K, L, d), logits (B, K, L), mask (B, L).
    Softmax over the interests (dim 1), as ComiRec's TensorFlow code (several PyTorch ports take
    it over the positions); only the last iteration passes gradients to u_hat."""
    u_hat_fixed = u_hat.detach()
    for it in range(iters):
        last = it == iters - 1
        weights = logits.softmax(1) * mask.unsqueeze(1)              # (B, K, L), padding: 0
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
    """One shared bilinear map; routing logits drawn once from N(0, 1) (MIND draws per batch: a
    fixed draw keeps evaluation deterministic)."""

    def __init__(self, cfg, n_items):
        super().__init__(cfg, n_items)
        self.bilinear = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.register_buffer("routing_init", torch.randn(cfg.interests, cfg.max_len))

    def forward(self, hist):
        B, L = hist.shape
        u_hat = self.bilinear(self.items(hist)).unsqueeze(1).expand(-1, self.cfg.interests, -1, -1)
        logits = self.routing_init[:, :L].expand(B, -1, -1)
        return dynamic_routing(u_hat, logits, (hist > 0).float(), self.cfg.routing_iters)

class ComiRecDR(Encoder):
    """A separate bilinear map per (position, interest); routing logits start at zero."""

    def __init__(self, cfg, n_items):
        super().__init__(cfg, n_items)
        shape = (cfg.max_len, cfg.interests, cfg.dim, cfg.dim)
        self.bilinear = nn.Parameter(torch.randn(*shape) * cfg.dim ** -0.5)

    def forward(self, hist):
        B, L = hist.shape
        u_hat = torch.einsum("bld,lkde->bkle", self.items(hist), self.bilinear[:L])  # (B, K, L, d)
        logits = torch.zeros(B, self.cfg.interests, L, device=hist.device)
        return dynamic_routing(u_hat, logits, (hist > 0).float(), self.cfg.routing_iters)

class ComiRecSA(Encoder):
    """Self-attentive: positions enter the attention only; interests mix the plain item vectors.
    REMI is this encoder trained with REMI's regulariser and negative weighting (losses)."""

    def __init__(self, cfg, n_items):
        super().__init__(cfg, n_items)
        self.positions = nn.Parameter(torch.randn(cfg.max_len, cfg.dim) * 0.02)
        self.hidden = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.heads = nn.Linear(4 * cfg.dim, cfg.interests)

    def forward(self, hist):
        e = self.items(hist)                                                    # (B, L, d)
        positions = self.positions[:hist.shape[1]]                              # (L, d)
        scores = self.heads(torch.tanh(self.hidden(e + positions)))             # (B, L, K)
        attention = scores.masked_fill((hist == 0).unsqueeze(-1), -torch.inf).softmax(1)
        attention = attention.transpose(1, 2)                                   # (B, K, L)
        return attention @ e, attention                                         # (B, K, d)

def make_model(cfg, n_items):
    encoders = {"mind": MIND, "comirec-dr": ComiRecDR, "comirec-sa": ComiRecSA, "remi": ComiRecSA}
    return encoders[cfg.model](cfg, n_items)

# -----------------------------------------------------------------------------
# losses (README: Encoders, EIMF losses)

def hard_readout(interests, target_vecs):
    """Training uses the interest closest to the target: (B, K, d), (B, d) -> (B, d)."""
    best = (interests * target_vecs.unsqueeze(1)).sum(-1).argmax(1)
    return interests[torch.arange(len(interests)), best]

def recommendation_loss(user_vecs, targets, item_table, cfg, gen=None):
    """Softmax cross-entropy of the target, batch mean, over all items ("full") or shared uniform
    negatives ("sampled"; the log-Q correction cancels). user_vecs (B, d), targets (B,) >= 1,
    item_table (N + 1, d). REMI (rbeta > 0), as Tokkiu/REMI's sampled_softmax_loss: loss =
    -s_pos + log(exp(s_pos) + sum_j w_j exp(s_j)), w_j = exp(rbeta s_j) / mean exp(rbeta s)."""
    if cfg.loss == "full":
        logits, column = user_vecs @ item_table[1:].T, targets - 1  # (B, N): padding never counts
    else:
        negatives = torch.randint(1, len(item_table), (cfg.negatives,), generator=gen)
        negatives = negatives.to(targets.device)
        positive = (user_vecs * item_table[targets]).sum(-1, keepdim=True)
        hits = negatives.unsqueeze(0) == targets.unsqueeze(1)      # accidental hits
        sampled = (user_vecs @ item_table[negatives].T).masked_fill(hits, -torch.inf)
        logits, column = torch.cat([positive, sampled], 1), torch.zeros_like(targets)  # (B, 1 + n)
    if cfg.model == "remi" and cfg.rbeta > 0:
        is_target = torch.arange(logits.shape[1], device=logits.device) == column.unsqueeze(1)
        negative = cfg.rbeta * logits.masked_fill(is_target, -torch.inf)  # (B, columns)
        n_neg = torch.isfinite(negative).sum(1, keepdim=True)
        log_w = negative - negative.logsumexp(1, keepdim=True) + n_neg.log()  # not detached
        logits = logits + log_w.masked_fill(is_target, 0.0)        # the positive unweighted
    return F.cross_entropy(logits, column)

def routing_regularizer(attention, dim):
    """REMI's routing regularisation (Tokkiu/REMI, src/REMI.py, calculate_atten_loss): per example
    and interest the squared deviations of the attention from its mean over all L positions
    (padding included), summed, divided by d, squared; summed over interests and the batch (not
    a mean: rlambda's effect grows with the batch). (B, K, L) -> scalar."""
    spread = ((attention - attention.mean(2, keepdim=True)) ** 2).sum(2) / dim  # (B, K)
    return (spread ** 2).sum()

def alignment_loss(interests, semantic, semantic_mask, tau, group=None):
    """Late-interaction InfoNCE between typical users' interests (B, K, d) and their projected
    semantic interests (B, J, d): sim(u, w) = mean_j max_k cos(s_wj, v_uk), symmetric. group (B,):
    users with identical semantic sets are not each other's negatives."""
    v, s = F.normalize(interests, dim=-1), F.normalize(semantic, dim=-1)
    cos = torch.einsum("ukd,wjd->uwjk", v, s).amax(-1)             # (B, B, J)
    m = semantic_mask.float().unsqueeze(0)
    sim = (cos * m).sum(-1) / m.sum(-1)                            # (B users, B owners)
    labels = torch.arange(len(v), device=v.device)
    if group is not None:
        twins = (group[None, :] == group[:, None]) & (labels[None, :] != labels[:, None])
        sim = sim.masked_fill(twins, -torch.inf)
    return (F.cross_entropy(sim / tau, labels) + F.cross_entropy(sim.T / tau, labels)) / 2

def prediction_loss(interests, prototypes, labels, weights):
    """BCE of z_up = max_k <v_uk, P_s p_p> against soft prototype labels (B, P); weights (B,)
    switch off users whose behaviour cluster kept no typical user."""
    z = torch.einsum("bkd,pd->bkp", interests, prototypes).amax(1)
    per_user = F.binary_cross_entropy_with_logits(z, labels, reduction="none").mean(1)
    return (per_user * weights).sum() / weights.sum().clamp_min(1)

# -----------------------------------------------------------------------------
# evaluation (README: Protocol): full ranking, max over interests, history masked

def mask_seen(scores, seen):
    """-inf on the padding column and each user's history, in place: (B, N + 1), seen (B, S)."""
    scores[:, 0] = -torch.inf
    return scores.scatter_(1, seen, -torch.inf)

@torch.no_grad()
def score_items(model, hist, seen):
    """score(u, i) = max_k <v_uk, e_i>, -inf on padding and history: hist (B, L), seen (B, S) ->
    (B, N + 1). ValueError for an empty history (ComiRec-SA's softmax over padding is NaN)."""
    empty = (hist == 0).all(1)
    if empty.any():
        raise ValueError(f"{int(empty.sum())} users have an empty history (rows "
                         f"{empty.nonzero()[:5, 0].tolist()}...): the encoders need an item")
    interests, table = model(hist)[0], model.items.weight
    scores = interests[:, 0] @ table.T
    for k in range(1, interests.shape[1]):
        torch.maximum(scores, interests[:, k] @ table.T, out=scores)
    return mask_seen(scores, seen)

def top_items(scores, n):
    """The n best columns of each row, best first, ties to the lower id: (B, N + 1) -> (B, n).
    topk may pick and order tied scores either way: a row with a tie at the cut is redone by a
    stable sort, and the n ids, in increasing order, are stably sorted by score."""
    n = min(n, scores.shape[1])
    values, ids = scores.topk(min(n + 1, scores.shape[1]), dim=1)  # one more, to see the cut
    crowded = (values[:, n:] == values[:, n - 1:n]).any(1).nonzero()[:, 0]
    ids = ids[:, :n]
    if len(crowded):
        ids[crowded] = scores[crowded].sort(dim=1, descending=True, stable=True).indices[:, :n]
    ids = ids.sort(dim=1).values
    return ids.gather(1, scores.gather(1, ids).sort(dim=1, descending=True, stable=True).indices)

@torch.no_grad()
def recommend(model, hist, seen, n):
    """Top-n item ids per user (B, n): the whole inference path (no LLM, no text)."""
    return top_items(score_items(model, hist, seen), n)

def metrics_from_ranks(ranks, n_targets, cutoffs):
    """Recall, NDCG and HitRate per user at each cut-off: ranks (B, T), 1-based, inf for a target
    off the list or padding; n_targets (B,) -> {"recall@20": (B,), ...}."""
    out, gain = {}, 1 / torch.log2(ranks + 1)                          # (B, T), 0 for inf
    for n in cutoffs:
        hit = ranks <= n
        ideal = (1 / torch.log2(torch.arange(2, n + 2, device=ranks.device).float())).cumsum(0)
        out[f"recall@{n}"] = hit.sum(1) / n_targets
        out[f"ndcg@{n}"] = (hit * gain).sum(1) / ideal[(n_targets.clamp(1, n) - 1)]
        out[f"hitrate@{n}"] = hit.any(1).float()
    return out

def trim(rows):
    """Drop the all-padding columns on the right of a right-padded (B, W) array (keep one)."""
    return rows[:, :max(1, int((rows > 0).sum(1).max()))]

@torch.no_grad()
def evaluate_per_user(score, evalset, device, batch=256, cutoffs=(10, 20, 50)):
    """Each user's metrics, full ranking: {"recall@20": (U,) float64, ...}. score(hist, seen) ->
    (B, N + 1), -inf for a non-candidate. A target's rank is its place in the top-max(cutoffs)
    list (top_items), so a user costs one ranking. Memory: a few (batch, N + 1) arrays."""
    parts = []
    for i in range(0, len(evalset.users), batch):
        hist = torch.from_numpy(evalset.hist[i:i + batch]).to(device)
        seen, targets = (torch.from_numpy(trim(a[i:i + batch])).to(device)
                         for a in (evalset.seen, evalset.targets))
        scores = score(hist, seen)
        top = top_items(scores, max(cutoffs))                                   # (B, n)
        listed = torch.isfinite(scores.gather(1, top))                          # (B, n)
        found = (top.unsqueeze(1) == targets.unsqueeze(2)) & listed.unsqueeze(1)  # (B, T, n)
        ranks = torch.where(found.any(2), found.int().argmax(2) + 1.0, torch.inf)  # (B, T)
        parts.append(metrics_from_ranks(ranks, (targets > 0).sum(1), cutoffs))
    return {k: torch.cat([p[k] for p in parts]).double().cpu().numpy() for k in parts[0]}

def evaluate(model, evalset, device, batch=256, cutoffs=(10, 20, 50)):
    """The mean over users of evaluate_per_user for an encoder: {"recall@20": float, ...}."""
    model.eval()
    scores = functools.partial(score_items, model)
    return {k: float(v.mean()) for k, v in
            evaluate_per_user(scores, evalset, device, batch, cutoffs).items()}

def popularity_metrics(split, n_items, cutoffs=(10, 20, 50)):
    """The floor every encoder must beat: test metrics of items ranked by training frequency."""
    train_items = torch.from_numpy(np.concatenate(list(split.train_seqs.values())))
    counts = torch.bincount(train_items, minlength=n_items + 1).float()       # (N + 1,)
    score = lambda hist, seen: mask_seen(counts.expand(len(hist), -1).clone(), seen)
    per_user = evaluate_per_user(score, split.test, torch.device("cpu"), cutoffs=cutoffs)
    return {k: float(v.mean()) for k, v in per_user.items()}

# -----------------------------------------------------------------------------
# k-means, from scratch: k-means++ seeding, Lloyd iterations, restarts

def assign_points(x, centroids, x_sq, chunk=65536):
    """Nearest centroid and squared distance of every point, one matrix product per chunk of
    rows; x_sq (n,), the points' squared norms, is constant along a row: added after the argmin."""
    c_sq = (centroids * centroids).sum(1)
    assign = torch.empty(len(x), dtype=torch.long, device=x.device)
    dist = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for start in range(0, len(x), chunk):
        rows = slice(start, min(start + chunk, len(x)))
        partial = torch.addmm(c_sq, x[rows], centroids.T, alpha=-2)  # (chunk, k): |c|^2 - 2<x, c>
        dist[rows], assign[rows] = partial.min(1)
    return assign, dist.add_(x_sq).clamp_min_(0)

def kmeans_pp(x, k, gen):
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2."""
    x_sq = (x * x).sum(1)
    first = torch.randint(len(x), (1,), generator=gen).item()
    centroids = x[first:first + 1]
    dist = assign_points(x, centroids, x_sq)[1]
    for _ in range(1, k):  # an inverse-CDF draw: 4x cheaper than torch.multinomial
        cumulative = dist.cpu().double().cumsum(0)
        u = torch.rand(1, dtype=torch.float64, generator=gen) * cumulative[-1]
        pick = (min(int(torch.searchsorted(cumulative, u, right=True)), len(x) - 1)
                if cumulative[-1] > 0 else torch.randint(len(x), (1,), generator=gen).item())
        centroids = torch.cat([centroids, x[pick:pick + 1]])
        dist = torch.minimum(dist, assign_points(x, centroids[-1:], x_sq)[1])
    return centroids

def lloyd(x, centroids, max_iter=100, tol=1e-4):
    """Lloyd iterations from given centroids -> centroids, assignment, inertia, its history."""
    k, x_sq, history = len(centroids), (x * x).sum(1), []
    min_shift = tol * x.var(0).sum().item()  # converged when centroids move less (squared)
    for _ in range(max_iter):
        assign, dist = assign_points(x, centroids, x_sq)
        history.append(dist.sum().item())
        counts = torch.bincount(assign, minlength=k)
        new = torch.zeros_like(centroids).index_add_(0, assign, x)
        new /= counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):  # re-seed empty clusters at the points that are worst served now
            new[empty] = x[dist.topk(len(empty)).indices]
        shift, centroids = ((new - centroids) ** 2).sum().item(), new
        if shift <= min_shift and not len(empty):
            break
    assign, dist = assign_points(x, centroids, x_sq)
    history.append(dist.sum().item())
    return centroids, assign, history[-1], history

def kmeans(x, k, n_init=4, seed=0, max_iter=100, tol=1e-4):
    """Best of n_init runs (lowest inertia), determined by the seed: x (n, d) -> centroids (k', d),
    assignment (n,), inertia; k' = k, or the number of distinct points when smaller (a warning).
    ValueError for no points or a non-finite one."""
    if not len(x) or not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(1).sum()) if len(x) else 0
        raise ValueError(f"k-means needs finite points: got {len(x)} points, {bad} with NaN or inf")
    distinct = len(torch.unique(x, dim=0))
    if distinct < k:
        log(f"warning: {distinct} distinct points for {k} clusters: using {distinct} clusters")
        k = distinct
    gen = torch.Generator().manual_seed(seed)
    runs = [lloyd(x, kmeans_pp(x, k, gen), max_iter, tol) for _ in range(n_init)]
    return min(runs, key=lambda r: r[2])[:3]  # the first of equal inertias

# -----------------------------------------------------------------------------
# ESIM (README: ESIM): typical users, their explicit interests, semantic prototypes and labels

class ParseError(ValueError):
    pass

@functools.lru_cache(maxsize=None)
def load_prompt(name):
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

def interests_schema(n_interests):
    """The JSON schema of an answer, sent as the request's response_format."""
    interest = {"type": "object", "additionalProperties": False,
                "required": ["name", "description"],
                "properties": {"name": {"type": "string"}, "description": {"type": "string"}}}
    return {"type": "object", "additionalProperties": False, "required": ["interests"],
            "properties": {"interests": {"type": "array", "items": interest,
                                         "minItems": n_interests, "maxItems": n_interests}}}

PLACEHOLDER = re.compile(r"^\W*$|<[^<>]*>|^\.\.\.|\.\.\.$")  # "", "...", "<one sentence>"

def parse_interests(text, n_interests):
    """[(name, description)] from a reply: the LAST JSON object with an "interests" list after any
    <think> block, prose or fences around it. ParseError for a wrong count, a placeholder copied
    from the prompt, or a repeated name."""
    text = text or ""
    if "<think>" in text and "</think>" not in text:
        raise ParseError("the reply stops inside its <think> block; no answer after it")
    text, decoder, found = text.rsplit("</think>", 1)[-1], json.JSONDecoder(), None
    for m in re.finditer(r"\{", text):  # a reasoning model drafts JSON before its answer
        try:
            obj = decoder.raw_decode(text, m.start())[0]
        except ValueError:
            continue
        found = obj if isinstance(obj, dict) and "interests" in obj else found
    if found is None:
        raise ParseError('no JSON object with an "interests" list found in the reply')
    interests, out = found["interests"], []
    if not isinstance(interests, list) or len(interests) != n_interests:
        n = len(interests) if isinstance(interests, list) else "no"
        raise ParseError(f'"interests" must list exactly {n_interests} interests, got {n}')
    for k, it in enumerate(interests, 1):
        name, description = (it.get("name"), it.get("description", "")) if isinstance(it, dict) \
            else (None, "")
        if not isinstance(name, str) or not name.strip() or len(name) > 80 \
                or not isinstance(description, str):
            raise ParseError(f"interest {k} needs a non-empty short string name and a string "
                             "description")
        name, description = name.strip(), description.strip()
        if PLACEHOLDER.search(name) or (description and PLACEHOLDER.search(description)):
            raise ParseError(f"interest {k} copies a placeholder of the prompt ({name!r}: "
                             f"{description!r}); write a real name and description")
        if name.lower() in {n.lower() for n, _ in out}:
            raise ParseError(f"interest {k} repeats the name {name!r}; give {n_interests} "
                             "distinct interests")
        out.append((name, description))
    return out

def llm_interests(client, data, train_seq, n_interests, max_items):
    """One chat request with the JSON schema, then one repair request quoting the parse error and
    at most 300 characters of the reply (none of a reply cut by max_tokens, so that the repair
    fits the context). ParseError if both fail; LLMError from the client."""
    messages = render_prompt(data, train_seq, n_interests, max_items)
    schema = interests_schema(n_interests)
    reply = client.chat(messages, schema)
    try:
        return parse_interests(reply, n_interests)
    except ParseError as e:
        cut = reply.finish_reason == "length"
        error = str(e) + ("; the reply was cut by max_tokens, so be brief" if cut else "")
        repair = load_prompt("repair.txt").substitute(error=error, n_interests=n_interests)
        reply = client.chat(messages + [{"role": "assistant", "content": "(cut)" if cut else
                                         reply[:300]}, {"role": "user", "content": repair}], schema)
        try:
            return parse_interests(reply, n_interests)
        except ParseError as e:
            raise ParseError(f"{e}; the repaired reply began {reply[:200]!r}") from None

def category_interests(data, train_seq, n_interests):
    """No LLM: the most frequent category paths of the training history, ties to the latest."""
    count, last = {}, {}
    for pos, item in enumerate(train_seq):
        for path in map(tuple, data.categories[int(item)]):
            count[path], last[path] = count.get(path, 0) + 1, pos
    ranked = sorted(count, key=lambda p: (-count[p], -last[p]))[:n_interests]
    return [(p[-1], " > ".join(p)) for p in ranked]

def normalize_rows(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

UNSPACED = re.compile(r"[\u0e00-\u0eff\u1000-\u109f\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")

def words(text):
    """The words of a text in any script (runs of letters and digits: for ASCII text [a-z0-9]+);
    a run in a script written without spaces (Thai, Lao, Burmese, Japanese, Chinese) gives its
    character bigrams instead."""
    runs = re.findall(r"[^\W_]+", text.lower())
    return [g for w in runs for g in ([w[i:i + 2] for i in range(max(1, len(w) - 1))]
                                      if UNSPACED.search(w) else [w])]

def hash_embed(texts, dim):
    """Deterministic hashed TF-IDF bag of words (crc32 buckets with a sign bit), L2-normalised."""
    docs = [words(t) for t in texts]
    df = {}
    for w in (w for doc in docs for w in set(doc)):
        df[w] = df.get(w, 0) + 1
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, doc in enumerate(docs):
        for w in doc:
            h, idf = zlib.crc32(w.encode()), math.log((1 + len(docs)) / (1 + df[w])) + 1
            out[row, h % dim] += idf if (h >> 31) & 1 else -idf
    return normalize_rows(out)

def select_typical(reps, assign, centroids, lengths, per_cluster, min_len):
    """Per cluster the users nearest the centroid with >= min_len training items, then the
    longest -> [(row, cluster, distance)]."""
    dist = (reps - centroids[assign]).norm(dim=1).cpu().numpy()
    assign, chosen = assign.cpu().numpy(), []
    for c in range(len(centroids)):
        members = np.flatnonzero(assign == c)
        rich = sorted((m for m in members if lengths[m] >= min_len), key=lambda m: dist[m])
        rest = sorted((m for m in members if lengths[m] < min_len),
                      key=lambda m: (-lengths[m], dist[m]))
        picked = rich[:per_cluster] + rest[:max(0, per_cluster - len(rich))]
        chosen += [(int(m), c, float(dist[m])) for m in picked]
    return chosen

@torch.no_grad()
def user_representations(model, split, users, max_len, device):
    """Mean of the backbone's K interests on each user's training history, L2-normalised (n, d)."""
    hist = torch.from_numpy(last_items([split.train_seqs[u] for u in users], max_len))
    reps = [model(hist[i:i + 4096].to(device))[0].mean(1) for i in range(0, len(hist), 4096)]
    return F.normalize(torch.cat(reps), dim=1)

def explicit_interests(data, split, typical, ecfg, client, out):
    """Interests [(name, description)] of each typical user, or None for one that failed (no parse
    after the repair, or a per-user LLMError): listed in out/failures.jsonl, never cached, so a
    rerun asks only for them. LLMError when no request can succeed (bad key, model or URL);
    SystemExit once more than ecfg.max_failed (a share) of the users have failed."""
    limit, t0 = int(ecfg.max_failed * len(typical)), time.time()
    stop, lock, fatal, failures = threading.Event(), threading.Lock(), [], []

    def work(n):  # the interests of typical user n, or None (and the failure recorded)
        if stop.is_set():  # over: more than `limit` failures, or a fatal error
            return None
        seq = split.train_seqs[typical[n]["user"]]
        if ecfg.backend == "categories":
            return category_interests(data, seq, ecfg.semantic_interests)
        try:
            return llm_interests(client, data, seq, ecfg.semantic_interests, ecfg.prompt_items)
        except (ParseError, LLMError) as e:
            with lock:
                if isinstance(e, LLMError) and not e.per_user:
                    fatal.append(e)
                else:
                    failures.append({"user": typical[n]["user"], "error": str(e)})
                if fatal or len(failures) > limit:
                    stop.set()

    if ecfg.backend == "llm":
        with open(os.path.join(out, "prompts.jsonl"), "w") as f:
            f.writelines(json.dumps({"user": t["user"], "messages": render_prompt(
                data, split.train_seqs[t["user"]], ecfg.semantic_interests, ecfg.prompt_items)})
                + "\n" for t in typical)
    results, last = [None] * len(typical), 0.0
    workers = ecfg.concurrency if ecfg.backend == "llm" else 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(work, n): n for n in range(len(typical))}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            results[futures[future]] = future.result()
            if not stop.is_set() and (time.time() - last >= 1 or done == len(typical)):
                last, rate = time.time(), done / max(time.time() - t0, 1e-9)  # one progress line
                asked = (f", {client.requests} requests, {client.cache_hits} cache hits"
                         if client else "")
                print(f"\r  {done}/{len(typical)}{asked}, {len(failures)} failed, ETA "
                      f"{(len(typical) - done) / rate:.0f} s   ", end="", flush=True)
    print()
    failures.sort(key=lambda x: x["user"])
    with open(os.path.join(out, "failures.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in failures)
    if fatal:
        raise fatal[0]
    if len(failures) > limit:
        raise SystemExit(f"error: {len(failures)} of {len(typical)} typical users failed (more "
                         f"than --max_failed {ecfg.max_failed:g}), first: "
                         f"{failures[0]['error'][:300]} (all in {out}/failures.jsonl); fix the "
                         "endpoint, model or prompts/ (or allow more with --max_failed) and run "
                         "again: answers so far are cached")
    with open(os.path.join(out, "interests.jsonl"), "w") as f:
        f.writelines(json.dumps({"user": t["user"], "interests": [{"name": a, "description": b}
                                 for a, b in r]}) + "\n" for t, r in zip(typical, results) if r)
    return results, failures

def semantic_labels(vectors, owner, clusters_of_typical, n_clusters, n_prototypes, seed, restarts):
    """Prototypes: k-means over the interest vectors (T, D), text t owned by typical user owner[t].
    A typical user's label is multi-hot over its texts' prototypes; a behaviour cluster's is the
    mean over its typical users (every user of the cluster inherits it). -> prototypes (P, D),
    cluster labels (n_clusters, P), labelled (n_clusters,); P < n_prototypes for fewer texts."""
    prototypes, text_proto, _ = kmeans(torch.from_numpy(vectors), n_prototypes, restarts, seed)
    multi_hot = np.zeros((len(clusters_of_typical), len(prototypes)), dtype=np.float32)
    multi_hot[owner, text_proto.numpy()] = 1
    cluster_label = np.zeros((n_clusters, len(prototypes)), dtype=np.float32)
    cluster_count = np.zeros(n_clusters)
    np.add.at(cluster_label, clusters_of_typical, multi_hot)
    np.add.at(cluster_count, clusters_of_typical, 1)
    cluster_label /= np.maximum(cluster_count, 1)[:, None]
    return prototypes.numpy(), cluster_label, cluster_count > 0

def derangement(n, rng):
    """A random permutation of range(n) with no fixed point: one cycle through a shuffled order."""
    order, to = rng.permutation(n), np.empty(n, dtype=np.int64)
    to[order] = np.roll(order, -1)
    return to

def build_esim(cfg, ecfg, backbone_dir, out):
    """The ESIM stage on the backbone run `cfg` trained in backbone_dir (ecfg resolved): behaviour
    clusters of its users, typical users, their interests embedded, prototypes and labels ->
    out/esim.npz, summary.json."""
    seed, t0 = cfg.seed, time.time()
    write_json(os.path.join(out, "config.json"),
               {**esim_identity(cfg, ecfg), "esim_config": dataclasses.asdict(ecfg)})
    data = load_dataset(cfg.data_dir, cfg.dataset)
    split = make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed)
    device = resolve_device(cfg.device)
    model = make_model(cfg, data.n_items).to(device)
    model.load_state_dict(torch.load(os.path.join(backbone_dir, "model.pt"), map_location=device,
                                     weights_only=True))
    model.eval()
    # behaviour clusters and typical users
    users = np.array(sorted(split.train_seqs))
    lengths = np.array([len(split.train_seqs[u]) for u in users])
    reps = user_representations(model, split, users, cfg.max_len, device)
    t1 = time.time()
    centroids, assign, inertia = kmeans(reps, ecfg.clusters, ecfg.kmeans_restarts, seed=seed)
    log(f"k-means: {len(users):,} users into {len(centroids)} clusters in "
        f"{time.time() - t1:.1f} s (inertia {inertia:.1f})")
    if ecfg.typical == "clustered":
        chosen = select_typical(reps, assign, centroids, lengths, ecfg.per_cluster, ecfg.min_len)
    else:  # ablation: as many users, drawn at random, with >= min_len items as the clustered
        n = int(np.minimum(np.bincount(assign.cpu().numpy()), ecfg.per_cluster).sum())
        rich = lengths >= ecfg.min_len
        rows = np.random.default_rng(seed).choice(np.flatnonzero(rich), min(n, rich.sum()),
                                                  replace=False)
        rest = sorted(np.flatnonzero(~rich), key=lambda r: -lengths[r])[:n - len(rows)]
        chosen = [(int(r), int(assign[r]), float("nan")) for r in sorted([*rows, *rest])]
    typical = [{"user": int(users[r]), "cluster": c, "distance": d, "train_items": int(lengths[r])}
               for r, c, d in chosen]
    write_json(os.path.join(out, "typical_users.json"), typical)
    if len(typical) > 0.2 * len(users):  # the typical users are no longer a few
        log(f"warning: {len(typical)} typical users are {100 * len(typical) / len(users):.0f} % of "
            f"the {len(users):,} training users: on data this small, lower --clusters (now "
            f"{ecfg.clusters}) or --per_cluster, and expect wide intervals")
    # their explicit interests, embedded
    client = LLMClient(ecfg) if ecfg.backend == "llm" or ecfg.embedder == "api" else None
    log(f"ESIM: {ecfg.backend} interests for {len(typical)} typical users")
    results, failures = explicit_interests(data, split, typical, ecfg, client, out)
    kept = [n for n, r in enumerate(results) if r]
    if not kept:
        raise SystemExit("error: no typical user got interests " + (
            "(no item of theirs has categories in items.jsonl, which the categories backend "
            "needs; use --backend llm)" if ecfg.backend == "categories" else
            f"(see {out}/failures.jsonl)"))
    texts = [f"{name}: {desc}" for n in kept for name, desc in results[n]]
    owner = np.array([row for row, n in enumerate(kept) for _ in results[n]])  # (T,) kept row
    vectors = client.embed(texts) if ecfg.embedder == "api" else hash_embed(texts, ecfg.hash_dim)
    empty = [t for t, v in zip(texts, vectors) if not v.any()]
    if len(empty) > len(texts) / 2:  # k-means would make one prototype, one label for all
        raise SystemExit(f"error: {len(empty)} of {len(texts)} interest texts embed to nothing "
                         f"(e.g. {empty[0]!r}): they have no letters or digits; use --embedder api")
    # semantic prototypes and labels
    prototypes, cluster_label, cluster_labelled = semantic_labels(
        vectors, owner, np.array([typical[n]["cluster"] for n in kept]), len(centroids),
        ecfg.prototypes, seed, ecfg.kmeans_restarts)
    width = max(len(results[n]) for n in kept)
    semantic = np.zeros((len(kept), width, vectors.shape[1]), dtype=np.float32)  # (typ., K_s, D)
    semantic_mask = np.arange(width) < np.bincount(owner, minlength=len(kept))[:, None]
    semantic[semantic_mask] = vectors  # texts are in owner order
    # typical users with one set of interest texts form a group (not each other's negatives)
    first_seen = {}
    group = np.array([first_seen.setdefault(tuple(sorted(results[n])), len(first_seen))
                      for n in kept])
    if ecfg.shuffle:  # control (README: The table): every statistic kept, the link to users cut
        rich = np.flatnonzero(cluster_labelled)
        if min(len(kept), len(rich)) < 2:
            raise SystemExit("error: the shuffled-semantics control (--shuffle) needs at least 2 "
                             "typical users with interests and 2 labelled clusters")
        rng = np.random.default_rng(seed)
        to = derangement(len(kept), rng)  # typical user n gets the interests of user to[n]
        semantic, semantic_mask, group = semantic[to], semantic_mask[to], group[to]
        cluster_label[rich] = cluster_label[rich[derangement(len(rich), rng)]]
    labels = np.zeros((len(data.sequences) + 1, len(prototypes)), dtype=np.float32)  # user id rows
    labelled = np.zeros(len(data.sequences) + 1, dtype=bool)
    labels[users] = cluster_label[assign.cpu().numpy()]
    labelled[users] = cluster_labelled[assign.cpu().numpy()]
    np.savez(os.path.join(out, "esim.npz"), semantic=semantic,
             typical_users=np.array([typical[n]["user"] for n in kept]),
             semantic_mask=semantic_mask, semantic_group=group,
             prototypes=prototypes, labels=labels, labelled=labelled, vectors=vectors)
    summary = {"typical_users": len(typical), "parsed": len(kept), "failures": len(failures),
               "texts": len(texts), "text_dim": int(vectors.shape[1]),
               "labelled_users": int(labelled.sum()), "train_users": len(users),
               "mean_label_mass": float(labels[users].sum(1).mean()),
               "seconds": round(time.time() - t0, 1), "prototypes": len(prototypes),
               "clusters": len(centroids),
               "typical_with_a_twin": int((np.bincount(group)[group] > 1).sum()),
               "requests": client.requests if client else 0,
               "cache_hits": client.cache_hits if client else 0, "code": code_version(),
               "served_models": sorted(client.served) if client else []}
    write_json(os.path.join(out, "summary.json"), summary)
    log(f"ESIM done in {summary['seconds']} s: {len(kept)} typical users, {len(texts)} interest "
        f"texts, {summary['labelled_users']:,} labelled users -> {out}")

# -----------------------------------------------------------------------------
# training: one stage per run folder (backbone, ESIM, EIMF), driven in that order by train()

class Semantics:
    """ESIM's outputs as tensors, and the text-to-behaviour head P_s (saved beside the model)."""

    def __init__(self, esim_dir, split, cfg, device):
        z = np.load(os.path.join(esim_dir, "esim.npz"))
        t = {k: torch.from_numpy(z[k]).to(device) for k in z.files if k != "typical_users"}
        self.semantic, self.semantic_mask = t["semantic"], t["semantic_mask"]
        self.semantic_group, self.prototypes = t["semantic_group"], t["prototypes"]
        self.labels, self.labelled = t["labels"], t["labelled"].float()
        typical = [split.train_seqs[int(u)] for u in z["typical_users"]]
        self.typical_hist = torch.from_numpy(last_items(typical, cfg.max_len)).to(device)
        self.head = nn.Linear(self.semantic.shape[-1], cfg.dim).to(device)

    def loss(self, model, interests, users, cfg, gen):
        """lambda_align * L_align (a side batch of typical users) + lambda_pred * L_pred."""
        pick = torch.randperm(len(self.typical_hist), generator=gen)[:cfg.align_batch]
        pick = pick.to(users.device)
        align = alignment_loss(model(self.typical_hist[pick])[0], self.head(self.semantic[pick]),
                               self.semantic_mask[pick], cfg.tau, self.semantic_group[pick])
        pred = prediction_loss(interests, self.head(self.prototypes), self.labels[users],
                               self.labelled[users])
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

class TrainingError(Exception):
    """A run that cannot go on (a non-finite loss); recorded as failed, never reused."""

def fit(cfg, out, ecfg=None, esim_dir=None):
    """The training stage: a backbone, or EIMF on the ESIM in esim_dir (ecfg resolved), trained in
    `out` until patience stops it; the best validation epoch is tested. TrainingError for a NaN
    or infinite loss (the run is recorded as failed)."""
    metrics_path, device, t0 = os.path.join(out, "metrics.json"), resolve_device(cfg.device), \
        time.time()
    write_json(os.path.join(out, "config.json"), {
        "config": dataclasses.asdict(cfg), "esim": dataclasses.asdict(ecfg) if cfg.eimf else None,
        "esim_dir": esim_dir, "identity": run_identity(cfg), "code": code_version()})
    data = load_dataset(cfg.data_dir, cfg.dataset)
    split = make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed)
    log(split_summary(data, split, cfg.protocol))
    repeat_summary(data, split)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, data.n_items).to(device)
    semantics = Semantics(esim_dir, split, cfg, device) if cfg.eimf else None
    params = list(model.parameters()) + (list(semantics.head.parameters()) if semantics else [])
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    shuffle = torch.Generator().manual_seed(cfg.seed)      # batch order
    sampler = torch.Generator().manual_seed(cfg.seed + 1)  # negatives and typical-user batches
    arrays = [torch.from_numpy(a) for a in (split.train_hist, split.train_target, split.train_user)]
    record = {"status": "running", "epochs": [], "best_epoch": 0, "valid": None, "test": None,
              "code": code_version(), "made": {"date": time.strftime("%F"), "cpu": cpu_name(),
                                               "threads": torch.get_num_threads(),
                                               "load": os.getloadavg()[0]}}
    best, best_state, bad_epochs = -1.0, None, 0
    log(f"training {cfg.model}{' + EIMF (' + cfg.eimf + ')' if cfg.eimf else ''} on {device}: "
        f"{sum(p.numel() for p in model.parameters()):,} parameters -> {out}")
    try:
        for epoch in range(1, cfg.max_epochs + 1):
            model.train()
            t_epoch, total, steps = time.time(), 0.0, 0
            order = torch.randperm(len(arrays[1]), generator=shuffle)
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                loss = training_step(model, optimizer, [a[idx].to(device) for a in arrays], cfg,
                                     sampler, semantics)
                total, steps = total + loss, steps + 1
                if not math.isfinite(loss):
                    record.update(status="failed",
                                  error=f"loss {loss} at epoch {epoch}, step {steps}")
                    write_json(metrics_path, record)
                    raise TrainingError(f"{out}: the training loss became {loss} at epoch {epoch}, "
                                        f"step {steps}; the run is recorded as failed. Lower --lr, "
                                        "or check ESIM's outputs for NaN (esim.npz) if this is an "
                                        "EIMF run")
            train_s = time.time() - t_epoch
            valid = evaluate(model, split.valid, device, cfg.eval_batch)
            score, eval_s = valid[cfg.select_metric], time.time() - t_epoch - train_s
            record["epochs"].append({"epoch": epoch, "loss": total / steps, "train_s":
                                     round(train_s, 2), "eval_s": round(eval_s, 2), "valid": valid})
            improved = score > best
            if improved:
                best, bad_epochs, record["best_epoch"], record["valid"] = score, 0, epoch, valid
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                save_atomic(best_state, os.path.join(out, "model.pt"))
                if semantics:
                    save_atomic(semantics.head.state_dict(), os.path.join(out, "heads.pt"))
            bad_epochs += not improved
            write_json(metrics_path, record)
            log(f"epoch {epoch:3d} | loss {total / steps:.4f} | valid {cfg.select_metric} "
                f"{score:.4f}{' *' if improved else '  '} | ndcg@20 {valid['ndcg@20']:.4f} | "
                f"{train_s:.1f} s train, {eval_s:.1f} s eval")
            if bad_epochs >= cfg.patience:
                break
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        write_json(metrics_path, record)
        best = f"the best model so far is {out}/model.pt" if best_state else "no epoch finished"
        log(f"interrupted: {len(record['epochs'])} epochs recorded in {metrics_path}; {best}; "
            "run again to restart this run")
        raise
    if bad_epochs < cfg.patience:
        log(f"stopped by --max_epochs {cfg.max_epochs} before patience ({cfg.patience}) did: the "
            "tables mark this run 'cap'; raise --max_epochs to train it to convergence")
    model.load_state_dict(best_state)
    model.eval()
    t_test = time.time()
    per_user = evaluate_per_user(functools.partial(score_items, model), split.test, device,
                                 cfg.eval_batch)
    # per-user test metrics beside metrics.json: the table's paired bootstrap resamples users
    np.savez_compressed(os.path.join(out, "test_per_user.npz"), users=split.test.users, **{
        k: v.astype(np.float32) for k, v in per_user.items() if not k.startswith("hitrate")})
    record["test"] = t = {k: float(v.mean()) for k, v in per_user.items()}
    record.update(status="done", stopped_by="patience" if bad_epochs >= cfg.patience else
                  "epoch cap", test_s=round(time.time() - t_test, 2),
                  total_s=round(time.time() - t0, 1), device=str(device))
    write_json(metrics_path, record)
    log(f"test (epoch {record['best_epoch']}): recall@20 {t['recall@20']:.4f} ndcg@20 "
        f"{t['ndcg@20']:.4f} recall@50 {t['recall@50']:.4f} ndcg@50 {t['ndcg@50']:.4f} | "
        f"{record['total_s']} s in all")

def run_stage(out, make, force=False):
    """Make one stage's folder with make(out), or reuse it: under the folder's lock, a finished
    record is reused unless `force`; while it is made, the log also goes to out/log.txt."""
    with folder_lock(out):
        if force or not finished(out):
            log.path = os.path.join(out, "log.txt")
            with contextlib.suppress(FileNotFoundError):
                os.remove(log.path)
            try:
                make(out)
            finally:
                log.path = None
    return out

def run_esim(cfg, ecfg, force=False):
    """The backbone (seed ecfg.esim_seed, or cfg.seed when 0), then ESIM on its folder; each is
    reused when finished (the ESIM is made again if `force`). Returns the ESIM's folder."""
    ecfg = resolve_esim(ecfg)
    backbone = backbone_config(cfg, ecfg)
    backbone_dir = run_stage(run_dir(backbone), lambda out: fit(backbone, out))
    return run_stage(esim_dir(cfg, ecfg), lambda out: build_esim(backbone, ecfg, backbone_dir, out),
                     force)

def train(cfg, ecfg=None, force=False):
    """Train (or reuse) one run and return its folder; an EIMF run (cfg.eimf: ESIM's backend)
    first makes its backbone and ESIM (run_esim) unless it is finished itself."""
    ecfg = resolve_esim(dataclasses.replace(ecfg or EsimConfig(), backend=cfg.eimf)) \
        if cfg.eimf else None
    out = run_dir(cfg, ecfg)
    esim = run_esim(cfg, ecfg) if cfg.eimf and (force or not finished(out, quiet=True)) else None
    return run_stage(out, lambda out: fit(cfg, out, ecfg, esim), force)

# -----------------------------------------------------------------------------
# LLM client: any OpenAI-compatible endpoint, requests only, with a persistent cache

class LLMError(Exception):
    """A request that failed for good, in the server's words (key redacted). per_user: it is one
    prompt's failure (ESIM counts that user as failed and goes on), else nothing can succeed."""

    def __init__(self, message, per_user=False):
        super().__init__(message)
        self.per_user = per_user

class FormatRejected(LLMError):
    """The server refused the request's `response_format` (the client tries the next shape)."""

class Reply(str):
    """The assistant's text of a chat reply, with `finish_reason` ("stop", "length", ...)."""
    finish_reason = "stop"

def retry_after_seconds(headers, now=None):
    """Seconds the server asks us to wait, or None: Retry-After as seconds or an HTTP-date (RFC
    9110 10.2.3), else OpenAI's x-ratelimit-reset-requests/-tokens ("6m0s", "20ms"). Up to an
    hour is clamped to 60 s; a negative, NaN or absurd value gives None (our own backoff)."""
    value, text, resets = None, (headers.get("Retry-After") or "").strip(), []
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:([\d.]+)s)?(?:(\d+)ms)?",
                         (headers.get(name) or "").strip())
        if m and any(m.groups()):
            h, mins, s, ms = (float(g or 0) for g in m.groups())
            resets.append(3600 * h + 60 * mins + s + ms / 1000)
    try:
        value = float(text) if text else max(resets) if resets else None
    except ValueError:
        with contextlib.suppress(TypeError, ValueError, IndexError):
            now = time.time() if now is None else now
            value = email.utils.parsedate_to_datetime(text).timestamp() - now
    return None if value is None or not 0 <= value <= 3600 else min(value, 60.0)

def endpoints(ecfg, chat=False, embed=False):
    """(base URL, embeddings base URL, chat model, embedding model), each from its option, else
    $OPENAI_BASE_URL, $OPENAI_EMBED_BASE_URL (else the base URL), $BIMI_CHAT_MODEL,
    $BIMI_EMBED_MODEL, else the default names. LLMError naming the option or variable for a
    missing endpoint, a URL without http(s):// or an empty model name that chat / embed need."""
    env = lambda name: os.environ.get(name, "").strip()
    base = (ecfg.base_url or env("OPENAI_BASE_URL")).strip().rstrip("/")
    embed_base = (ecfg.embed_base_url or env("OPENAI_EMBED_BASE_URL")).strip().rstrip("/") or base
    chat_model = (ecfg.chat_model or env("BIMI_CHAT_MODEL") or "gpt-4o-mini").strip()
    embed_model = (ecfg.embed_model or env("BIMI_EMBED_MODEL") or "text-embedding-3-small").strip()
    url = "http://localhost:8000/v1"
    no_llm = ", or use --backend categories --embedder hash (no LLM)"
    base_name = "--base_url" if ecfg.base_url else "OPENAI_BASE_URL"
    embed_name = "--embed_base_url" if ecfg.embed_base_url else \
        "OPENAI_EMBED_BASE_URL" if env("OPENAI_EMBED_BASE_URL") else base_name
    checks = [(base, base_name, "the chat endpoint (--backend llm)", url + no_llm),
              (chat_model, "--chat_model (or BIMI_CHAT_MODEL)", "a chat model name", "gpt-4o-mini")]
    checks = checks * chat + [(embed_base, embed_name, "an embeddings endpoint (--embedder api)",
                               url + no_llm), (embed_model, "--embed_model (or BIMI_EMBED_MODEL)",
                               "an embedding model name", "text-embedding-3-small")] * embed
    for value, name, what, example in checks:
        if not value:
            raise LLMError(f"{name} is empty but {what} is needed: set it, e.g. {example}")
        if "url" in name.lower() and not re.match(r"https?://[^/\s]+", value):
            raise LLMError(f"{name} is {value!r}: it needs http:// or https:// and a host, e.g. "
                           f"{url}")
    return base, embed_base, chat_model, embed_model

QUOTA_WORDS = re.compile(r"quota|billing|credit|insufficient_funds|payment", re.I)
BATCH_WORDS = re.compile(r"batch|too (?:large|many|long)|at most \d+|limit|entity", re.I)
FORMAT_WORDS = re.compile(r"response_format|json_schema|schema|grammar", re.I)
PASSING_WORDS = re.compile(r"loading|unavailable|overloaded|try again|temporar", re.I)  # it passes
RESPONSE_FORMATS = (  # structured output, in the shapes servers accept, tried in this order
    lambda schema: {"type": "json_schema",
                    "json_schema": {"name": "answer", "schema": schema, "strict": True}},
    lambda schema: {"type": "json_object", "schema": schema})  # llama.cpp's servers

class LLMClient:
    """Chat and embedding requests to an OpenAI-compatible endpoint (OpenAI, vLLM, Ollama's /v1,
    llama.cpp, LM Studio, gateways) with retries, a persistent cache of valid answers only, and
    errors in the server's words. The key ($OPENAI_API_KEY) is never printed, cached or saved."""

    def __init__(self, ecfg, log=log):
        self.cfg, self.log = ecfg, log
        self.base, self.embed_base, self.chat_model, self.embed_model = endpoints(ecfg)
        self.key = os.environ.get("OPENAI_API_KEY", "").strip()
        self.requests = self.cache_hits = 0
        self.lock, self.one_at_a_time = threading.Lock(), threading.Lock()
        self.serial = False                    # one request at a time once a timeout showed it
        self.formats = list(RESPONSE_FORMATS)  # response_format shapes still to try, best first
        self.warned, self.rng = set(), random.Random(0)  # the rng: jitter only
        self.served = set()  # (kind, model name the server reported), cached answers included

    def said(self, text):
        return text.replace(self.key, "***") if self.key else text

    def failure(self, base, path, status, body, text, payload):
        """An error reply -> (retryable?, LLMError). status: HTTP status, or the `code` of an error
        object inside a 200 reply; body: the parsed JSON or None; text: the raw body."""
        where = f"{base + path} (model {payload['model']})"
        error = body.get("error") if isinstance(body, dict) else None
        embeddings = path == "/embeddings"
        words = str(error.get("message") or error) if isinstance(error, dict) else \
            str(error or "") or text.strip()[:300] or "(empty body)"
        kind = f"{error.get('type')} {error.get('code')}" if isinstance(error, dict) else ""
        said = self.said(f"HTTP {status}: {' '.join(words.split())[:400]}")  # one line, always
        if payload.get("response_format") and FORMAT_WORDS.search(words) \
                and (status in (400, 422) or status >= 500):
            return False, FormatRejected(f"{where} does not take this response_format: {said}")
        if status == 429 and QUOTA_WORDS.search(words + " " + kind):
            return False, LLMError(f"{where}: quota or billing exhausted, not retried: {said}")
        if status in (408, 409, 429) or status >= 500:
            hint = ("; if this repeats, lower --embed_batch (inputs per request)"
                    if embeddings and BATCH_WORDS.search(words) else "")
            return True, LLMError(f"{where}: {said}{hint}", per_user=not embeddings)
        if status in (401, 403):
            return False, LLMError(f"{where} refused the key: {said}; check OPENAI_API_KEY")
        if status == 404:
            hint = (f"; the base URL {base} should end in /v1 (e.g. {base}/v1)"
                    if not re.search(r"/v\d+$", base) else "; check the base URL and the model "
                    "name (--chat_model / --embed_model, or BIMI_CHAT_MODEL / BIMI_EMBED_MODEL)")
            return False, LLMError(f"{where}: not found: {said}{hint}")
        if embeddings and (status == 413 or BATCH_WORDS.search(words)):
            return False, LLMError(f"{where}: {said}; the batch is too large for this server: "
                                   f"lower --embed_batch (now {self.cfg.embed_batch}), e.g. "
                                   "--embed_batch 8")
        if status in (400, 413, 422) and not embeddings:  # this prompt: filter, context length
            return False, LLMError(f"{where} refused this prompt: {said}", per_user=True)
        return False, LLMError(f"{where} refused the request: {said}")

    def post(self, base, path, payload):
        """POST one JSON request -> the JSON reply (a dict without an `error`). Retries connection
        errors, 408/409/429 and 5xx with exponential backoff (or Retry-After); the same 5xx twice
        stops early. A timeout is not re-sent (a serial local server is still working on it): it
        fails this request, and later ones go one at a time. Raises LLMError only."""
        url, last = base + path, None
        headers = {"Authorization": "Bearer " + self.key} if self.key else {}
        where, timeout = f"{url} (model {payload['model']})", self.cfg.timeout
        for attempt in range(self.cfg.max_retries + 1):
            wait = None
            with self.lock:
                self.requests += 1
            try:
                with self.one_at_a_time if self.serial else contextlib.nullcontext():
                    r = requests.post(url, json=payload, headers=headers, timeout=timeout)
            except requests.Timeout:
                if not self.serial:
                    self.serial = True
                    self.log(f"  {url}: no reply within --timeout {timeout:g} s; sending one "
                             "request at a time from now on (a local server answers one prompt "
                             "after another)")
                raise LLMError(f"{where}: no reply within --timeout {timeout:g} s; not re-sent "
                               "(the server may still be working on it): raise --timeout",
                               per_user=True) from None
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
                cut = not isinstance(e, requests.ConnectionError)  # a new request may cure both
                error = LLMError(f"{where}: " + ("the reply broke off mid-body" if cut else
                                 "cannot connect") + f" ({type(e).__name__}); is the server "
                                 "running?", per_user=cut)
            except requests.exceptions.ContentDecodingError:
                raise LLMError(f"{where}: the body is not compressed as its Content-Encoding "
                               "header says (a proxy garbles it?)") from None
            except requests.RequestException as e:  # invalid URL, too many redirects ...
                raise LLMError(f"{where}: {self.said(str(e))}") from None
            else:
                text = r.content.decode("utf-8", "replace")  # JSON is UTF-8 (RFC 8259), whatever
                try:                                         # charset a header claims
                    body = json.loads(r.content)
                except ValueError:
                    body = None
                status = r.status_code
                if status == 200 and isinstance(body, dict) and "error" not in body:
                    return body
                if status == 200 and not isinstance(body, dict):
                    kind = r.headers.get("Content-Type", "")
                    sse = "event-stream" in kind or text.lstrip().startswith("data:")
                    raise LLMError(f"{where} answered HTTP 200 with a body that is not a JSON "
                                   f"object ({kind or 'no Content-Type'}): "
                                   f"{self.said(text.strip()[:200])!r}" + (
                                       "; the kit asks for \"stream\": false, so this server "
                                       "ignores it" if sse else "; it is gzip data without a "
                                       "Content-Encoding header" if r.content[:2] == b"\x1f\x8b"
                                       else "; is the base URL an OpenAI-compatible /v1 endpoint?"))
                if status == 200:  # an error object inside a 200 reply (gateways): by its code
                    error = body["error"]
                    code = str(error.get("code") if isinstance(error, dict) else None)
                    status = int(code) if code.isdigit() else 429 if "rate" in str(error).lower() \
                        else 400
                retryable, error = self.failure(base, path, status, body, text, payload)
                if not retryable:
                    raise error
                passing = status in (502, 503, 504) or PASSING_WORDS.search(str(error))
                if str(error) == last and status >= 500 and not passing:  # deterministic
                    raise LLMError(f"{error} (the same answer twice: not retried further)",
                                   error.per_user)
                last, wait = str(error), retry_after_seconds(r.headers)
            if attempt == self.cfg.max_retries:
                raise LLMError(f"giving up after {attempt + 1} attempts: {error}", error.per_user)
            if wait is None:
                wait = min(self.cfg.retry_wait * 2.0 ** attempt, 60.0) * (0.5 + self.rng.random())
            self.log(f"  {error}; retrying in {wait:.1f} s")
            time.sleep(wait)

    def cache_path(self, kind, base, payload):
        key = hashlib.sha256(json.dumps([kind, base, payload], sort_keys=True).encode()).hexdigest()
        return os.path.join(self.cfg.cache_dir, "llm", key[:2], key + ".json")

    def cached(self, kind, base, payload, extract):
        """The answer to `payload`, from the cache or the server. extract(body) -> (value,
        cacheable), or LLMError for a reply with no answer: never cached, so that a fixed server
        is asked again on the next run."""
        path = self.cache_path(kind, base, payload)
        if os.path.exists(path):  # an entry a crash or a full disk cut short is a miss
            try:
                with open(path) as f:
                    entry = json.load(f)
                reply, served = entry["reply"], entry.get("model") or payload["model"]
                with self.lock:
                    self.cache_hits += 1
                    self.served.add((kind, served))
                return reply
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.log(f"warning: unreadable cache entry {path} ({type(e).__name__}): asking "
                         "again")
        body = self.post(base, "/" + kind, payload)
        served, asked = body.get("model"), payload["model"]
        served = served if isinstance(served, str) else ""
        self.served.add((kind, served or asked))
        if served and not served.startswith(asked) and not asked.startswith(served) \
                and kind not in self.warned:
            self.warned.add(kind)
            self.log(f"warning: {base}/{kind} asked for model {asked!r} answers as {served!r}; "
                     "the run records the name asked for")
        value, cacheable = extract(body)
        try:
            if cacheable:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_json(path, {"reply": value, "model": served, "kind": kind})
        except OSError as e:  # the answer is still used; the run goes on
            if "write" not in self.warned:
                self.warned.add("write")
                self.log(f"warning: cannot write the request cache in {self.cfg.cache_dir} ({e}); "
                         "this run's answers are not kept: free space or set --cache_dir")
        return value

    def chat(self, messages, schema=None):
        """The assistant's Reply to [{"role", "content"}, ...]. schema: a JSON schema sent as
        response_format in the first shape the server takes (json_schema, then llama.cpp's
        json_object + schema, then none; remembered). LLMError (per_user) for a reply with no
        answer: no choices, content not text, cut before any text (never cached, nor a cut one)."""
        endpoints(self.cfg, chat=True)
        while True:
            shape = self.formats[0] if schema and self.formats else None
            payload = {"model": self.chat_model, "messages": messages, "stream": False,
                       "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens,
                       **({"response_format": shape(schema)} if shape else {})}
            try:
                answer = self.cached("chat/completions", self.base, payload, self.chat_answer)
                reply = Reply(answer["text"])
                reply.finish_reason = answer["finish_reason"]
                return reply
            except FormatRejected as e:
                with self.lock:
                    if self.formats and self.formats[0] is shape:
                        self.formats.pop(0)
                        rest = "its next shape" if self.formats else "without it"
                        self.log(f"  {e}; trying {rest}")

    def chat_answer(self, body):
        where = f"{self.base}/chat/completions (model {self.chat_model})"
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LLMError(f"{where} answered with no choices (an output filter?): "
                           f"{self.said(json.dumps(body)[:200])}", per_user=True)
        message, finish = choices[0].get("message") or {}, choices[0].get("finish_reason")
        content = message.get("content") if isinstance(message, dict) else None
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if content is None and isinstance(calls, list) and calls:  # a schema as a forced tool
            content = ((calls[0] or {}).get("function") or {}).get("arguments")
        if isinstance(content, list):  # content as parts: [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text") for p in content if isinstance(p.get("text"), str)) \
                if all(isinstance(p, dict) for p in content) else None
        cut = finish == "length"
        if not isinstance(content, str) or (cut and not content.strip()):
            reason = ("cut by max_tokens before any answer: raise --max_tokens (now "
                      f"{self.cfg.max_tokens}) or shorten the prompt (--prompt_items)" if cut
                      else f"content is {type(content).__name__}, not text")
            raise LLMError(f"{where}: no answer in the reply ({reason})", per_user=True)
        return {"text": content, "finish_reason": finish or "stop"}, not cut

    def embed(self, texts):
        """L2-normalised (len(texts), D) float32 vectors, in requests of embed_batch texts. A reply
        with a wrong count, unequal widths or a non-finite number is an LLMError (not cached)."""
        endpoints(self.cfg, embed=True)
        where = f"{self.embed_base}/embeddings (model {self.embed_model})"

        def check(batch, body):
            data = body.get("data")
            if not isinstance(data, list) or len(data) != len(batch):
                raise LLMError(f"{where} returned {len(data) if isinstance(data, list) else 'no'} "
                               f"vectors for {len(batch)} texts; if the server embeds one text per "
                               "request, use --embed_batch 1")
            try:
                rows = [d["embedding"] for d in (sorted(data, key=lambda d: d["index"])
                                                 if all("index" in d for d in data) else data)]
                rows = [np.frombuffer(base64.b64decode(r), "<f4").tolist() if isinstance(r, str)
                        else r for r in rows]  # base64 though "float" was asked for
                vectors = np.array(rows, dtype=np.float64)
            except (KeyError, TypeError, ValueError) as e:
                raise LLMError(f"{where} answered in an unexpected shape ({type(e).__name__}: "
                               f"{e}); is it OpenAI-compatible?") from None
            if vectors.ndim != 2 or not vectors.shape[1]:
                raise LLMError(f"{where} returned vectors of unequal or zero width")
            bad = np.flatnonzero(~np.isfinite(vectors).all(1))
            if len(bad):
                raise LLMError(f"{where} returned NaN or inf for {len(bad)} text(s), e.g. "
                               f"{batch[bad[0]]!r}; not cached")
            return rows, True

        batches = [texts[i:i + self.cfg.embed_batch] for i in range(0, len(texts),
                                                                    self.cfg.embed_batch)]
        payloads = [{"model": self.embed_model, "input": b, "encoding_format": "float"}
                    for b in batches]
        was_cached = [os.path.exists(self.cache_path("embeddings", self.embed_base, p))
                      for p in payloads]
        ask = lambda b, p: self.cached("embeddings", self.embed_base, p,
                                       functools.partial(check, b))
        with concurrent.futures.ThreadPoolExecutor(self.cfg.concurrency) as pool:
            rows = list(pool.map(ask, batches, payloads))
        changed = False
        if any(was_cached) and not all(was_cached):  # answers of two runs meet: one model for both?
            k = was_cached.index(True)
            again = np.array(check(batches[k], self.post(self.embed_base, "/embeddings",
                                                         payloads[k]))[0])
            changed = again.shape != np.shape(rows[k]) or (normalize_rows(again) * normalize_rows(
                np.array(rows[k]))).sum(1).min() < 0.999
        widths = sorted({len(v) for out in rows for v in out})
        if changed or len(widths) > 1:
            raise LLMError(f"{where}: the model behind this name changed since answers were "
                           f"cached (widths {widths}; cached texts embed otherwise now); delete "
                           f"{self.cfg.cache_dir}/llm or name the model with --embed_model")
        return normalize_rows(np.array([v for out in rows for v in out], dtype=np.float32))

# -----------------------------------------------------------------------------
# run records: identity, folders, atomic writes, locks

# Paths and batch sizes that do not change a run's results are left out of its identity; the
# device is replaced by its resolved type (CPU and CUDA runs differ in rounding).
NOT_IDENTITY = ("data_dir", "out_dir", "device", "eval_batch", "base_url", "embed_base_url",
                "timeout", "max_retries", "retry_wait", "concurrency", "cache_dir", "max_failed")
EIMF_FIELDS = ("eimf", "lambda_align", "lambda_pred", "tau", "align_batch")
REMI_FIELDS = ("rlambda", "rbeta")  # used by the remi model only
ADDED = {"shuffle": False}  # options newer than finished runs: at this value, not in the identity

def identity(cfg):
    """The fields of one config that decide a run's results."""
    unused = NOT_IDENTITY + ((EIMF_FIELDS * (not cfg.eimf) + REMI_FIELDS * (cfg.model != "remi"))
                             if isinstance(cfg, Config) else ())
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in unused and not (k in ADDED and ADDED[k] == v)}

@functools.lru_cache(maxsize=None)
def file_sha256(path, size, mtime_ns):  # read once per process unless size or mtime change
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

def files_digest(paths):
    """sha256 (16 hex digits) of the files' contents, in order."""
    digest = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        digest.update(file_sha256(os.path.abspath(p), st.st_size, st.st_mtime_ns).encode())
    return digest.hexdigest()[:16]

def short_hash(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]

def run_identity(cfg):
    """What decides a training run's numbers: its config, the contents of the data files (not
    their folder) and the device type. DataError if the data is missing."""
    folder = find_data(cfg.data_dir, cfg.dataset)
    data = files_digest([os.path.join(folder, f) for f in ("sequences.txt", "items.jsonl")])
    return {**identity(cfg), "data_sha256": data, "device_type": resolve_device(cfg.device).type}

def resolve_esim(ecfg):
    """The EsimConfig a run records and hashes: endpoints and model names resolved (endpoints()),
    those its backend does not use blanked. LLMError for a bad endpoint or model name."""
    llm, api = ecfg.backend == "llm", ecfg.embedder == "api"
    base, embed_base, chat_model, embed_model = endpoints(ecfg, chat=llm, embed=api)
    return dataclasses.replace(ecfg, base_url=base if llm or api else "", chat_model=chat_model
                               if llm else "", embed_base_url=embed_base if api else "",
                               embed_model=embed_model if api else "")

def backbone_config(cfg, ecfg):
    """The backbone run an ESIM reads: seed ecfg.esim_seed, or cfg.seed when that is 0."""
    return dataclasses.replace(cfg, seed=ecfg.esim_seed or cfg.seed, **{
        f: Config.__dataclass_fields__[f].default for f in EIMF_FIELDS})

def esim_identity(cfg, ecfg):
    """What decides an ESIM's output: its backbone run, its resolved config, and for the llm
    backend the prompt templates."""
    prompts = files_digest(sorted(os.path.join(PROMPTS, p) for p in os.listdir(PROMPTS)
                                  if p.endswith(".txt")))
    return {"backbone": run_identity(backbone_config(cfg, ecfg)), "esim": identity(ecfg),
            "prompts_sha256": prompts if ecfg.backend == "llm" else None}

def run_dir(cfg, ecfg=None):
    """out_dir/<dataset>/<model>-<protocol>[-eimf-<backend>]-s<seed>-<hash of the identity>;
    ecfg (resolved) for an EIMF run."""
    ident, name = run_identity(cfg), f"{cfg.model}-{cfg.protocol}"
    if cfg.eimf:
        ident, name = {"train": ident, "esim": esim_identity(cfg, ecfg)}, f"{name}-eimf-{cfg.eimf}"
    return os.path.join(cfg.out_dir, cfg.dataset, f"{name}-s{cfg.seed}-{short_hash(ident)}")

def esim_dir(cfg, ecfg):
    name = (f"esim-{cfg.model}-{cfg.protocol}-{ecfg.backend}-{ecfg.embedder}-"
            f"s{backbone_config(cfg, ecfg).seed}-{short_hash(esim_identity(cfg, ecfg))}")
    return os.path.join(cfg.out_dir, cfg.dataset, name)

def resolve_device(name):
    """"auto" -> CUDA when present, else the CPU. SystemExit for "cuda" without CUDA."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but this torch has no usable CUDA device; use "
                         "--device cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" \
        else torch.device(name)

@functools.lru_cache(maxsize=None)
def cpu_name():
    """The CPU: its model name, family and model, and the vector kernels torch runs on it. A
    seed's run is exact to the digit on one kind of CPU only (README: Reproducing a table)."""
    info = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())  # the first CPU's
    name = info.get("model name") or platform.processor() or platform.machine() or "a CPU"
    kind = [f"family {info['cpu family']}, model {info['model']}"] * (
        "cpu family" in info and "model" in info)
    return f"{name} ({', '.join(kind + [torch.backends.cpu.get_cpu_capability() + ' kernels'])})"

@functools.lru_cache(maxsize=None)
def code_version():
    """The code that makes a run: sha256 of bimi.py (12 hex digits), the torch version, and the
    checkout's git commit when there is one ("+dirty" when bimi.py or prompts/ differ from it)."""
    with open(os.path.abspath(__file__), "rb") as f:
        version = {"bimi_sha256": hashlib.sha256(f.read()).hexdigest()[:12], "git": None,
                   "torch": torch.__version__}
    git = ["git", "-C", os.path.dirname(os.path.abspath(__file__))]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(git + ["diff", "--quiet", "HEAD", "--", "bimi.py", "prompts"],
                                   timeout=10).returncode
            version["git"] = commit.stdout.strip() + ("+dirty" if dirty else "")
    return version

def finished(out, quiet=False, _warned=set()):
    """The finished record of a run (metrics.json, status "done") or an ESIM (summary.json) in
    `out`, or None (an unreadable one too). Logs the reuse unless quiet, with one warning per
    other version of bimi.py or torch that made reused runs (its numbers may differ)."""
    for name, what in (("metrics.json", "finished run"), ("summary.json", "ESIM run")):
        path = os.path.join(out, name)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                return log(f"warning: {path} is unreadable (a crash while writing?): remaking it")
            if record.get("status", "done") != "done" or quiet:
                return record if record.get("status", "done") == "done" else None
            made_by, now = record.get("code") or {}, code_version()
            old = made_by.get("git") or made_by.get("bimi_sha256", "unrecorded code")
            for other, kind, mine in ((made_by.get("bimi_sha256") != now["bimi_sha256"] and old,
                                       "code", now["git"] or now["bimi_sha256"]),
                                      (made_by.get("torch", now["torch"]) != now["torch"] and
                                       made_by["torch"], "torch", now["torch"])):
                if other and other not in _warned:
                    _warned.add(other)
                    log(f"warning: reusing runs made by other {kind} ({other} vs {mine} now), e.g. "
                        f"{out}; `train --force`, `esim --force` or a fresh --out_dir remakes "
                        "them")
            log(f"reusing {what} {out}")
            return record
    return None

@contextlib.contextmanager
def folder_lock(folder):
    """Exclusive use of a run or ESIM folder by one process (POSIX flock): another process waits,
    then reuses what the first finished; the OS drops the lock when its process ends."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is making {folder}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield

def write_json(path, obj):
    """Atomic: a reader sees the old file or the new one, never half of it (nor a temporary file
    left behind). Readable by all, as the other files of a run."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # an interrupt after the replace
            os.unlink(tmp)
        raise

def save_atomic(state, path):
    """torch.save through a temporary file, so that an interrupt never leaves half a model."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)

# -----------------------------------------------------------------------------
# tables (README: The table)

ROWS = [  # (row label, model, EIMF on?, config overrides, ESIM overrides, group)
    *[(m, m, False, {}, {}, "main") for m in MODELS],
    *[(f"{m} + EIMF", m, True, {}, {}, "main") for m in MODELS],
    ("comirec-sa + EIMF w/o alignment", "comirec-sa", True, {"lambda_align": 0.0}, {}, "ablation"),
    ("comirec-sa + EIMF w/o prediction", "comirec-sa", True, {"lambda_pred": 0.0}, {}, "ablation"),
    ("comirec-sa + EIMF, random users", "comirec-sa", True, {}, {"typical": "random"}, "ablation"),
    *[(f"{m} + EIMF, shuffled semantics", m, True, {}, {"shuffle": True}, "control")
      for m in MODELS],
    ("comirec-sa + EIMF, categories backend", "comirec-sa", True, {},  # an LLM table's no-LLM row
     {"backend": "categories", "embedder": "hash"}, "llm reference")]
CONTRASTS = {"shuffled semantics": "real over shuffled semantics",  # row suffix -> contrast
             "categories backend": "LLM over the categories backend"}
TABLE_METRICS = ("recall@20", "ndcg@20", "hitrate@20", "recall@50", "ndcg@50", "hitrate@50")
GAIN_METRICS = ("recall@20", "ndcg@20")
TUNED = {  # (dataset or "*", backbone) -> settings chosen on validation, seed 1 (README: Tuning)
    ("*", "mind"): {"lambda_align": 0.025, "lambda_pred": 0.125},  # EIMF's weights x0.25, Beauty
    ("*", "comirec-dr"): {"lambda_align": 0.2, "lambda_pred": 1.0},  # x2
    ("*", "comirec-sa"): {"lambda_align": 0.1, "lambda_pred": 0.5},  # x1
    ("*", "remi"): {"lambda_align": 0.05, "lambda_pred": 0.25},  # x0.5
    ("yelp", "mind"): {"lr": 0.003}, ("yelp", "comirec-sa"): {"lr": 0.003},  # else 0.006
    ("yelp", "remi"): {"lr": 0.001}}

def tuned(dataset, model):
    """The settings reproduce gives a row of `model` on `dataset` ("*": every dataset)."""
    return {**TUNED.get(("*", model), {}), **TUNED.get((dataset, model), {})}

def t_quantile(p, df):
    """Student's t quantile (p > 0.5, df > 0, math.inf for the normal), by integrating its density
    on a grid of 2^20 steps: 4.3027 for (0.975, 2), 1.9600 for (0.975, inf)."""
    x = np.linspace(0, 64, 2 ** 20 + 1)
    if math.isinf(df):
        density = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    else:
        density = np.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)
                         - (df + 1) / 2 * np.log1p(x * x / df)) / math.sqrt(df * math.pi)
    area = np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2 * (x[1] - x[0]))])
    return float(np.interp(p - 0.5, area, x))

def gain_interval(backbone, eimf):
    """EIMF's relative gain over its backbone with a 95 % interval that counts both sources of
    noise (README: The table). backbone, eimf: (S, U) per-user test metrics of S paired seeds.
    gain = mean(eimf - backbone) / mean(backbone). Its variance = the users' (delta method on the
    seed-averaged per-user values) + the seeds' (the sample variance of the S per-seed gains / S);
    the interval is gain +- t(0.975, Welch-Satterthwaite df) * sd. With one seed the seeds' share
    is unknown and left out. -> (gain %, low %, high %)."""
    backbone, eimf = np.asarray(backbone, dtype=np.float64), np.asarray(eimf, dtype=np.float64)
    (seeds, users), base, diff = backbone.shape, backbone.mean(0), (eimf - backbone).mean(0)
    if users < 2 or not backbone.mean(1).all():  # no relative gain over a backbone scoring 0
        return math.nan, math.nan, math.nan
    gain = diff.mean() / base.mean()
    var_users = np.var(diff - gain * base, ddof=1) / users / base.mean() ** 2
    per_seed = (eimf - backbone).mean(1) / backbone.mean(1)                     # (S,)
    var_seeds = np.var(per_seed, ddof=1) / seeds if seeds > 1 else 0.0
    var = var_users + var_seeds
    df = var ** 2 / (var_seeds ** 2 / (seeds - 1)) if var_seeds > 0 else math.inf
    half = t_quantile(0.975, df) * math.sqrt(var)
    return float(100 * gain), float(100 * (gain - half)), float(100 * (gain + half))

def table_rows(backend, models, ablations, controls=("comirec-sa",)):
    """The backbones in `models`, their EIMF rows, the ComiRec-SA ablations when asked, the
    shuffled-semantics control of the backbones in `controls`, and with the llm backend the
    categories row as the no-LLM reference."""
    wanted = {"main", "ablation" if ablations else "", "llm reference" if backend == "llm" else ""}
    return [row for row in ROWS if row[1] in models and (row[5] in wanted or row[5] == "control"
                                                         and row[1] in controls)]

def table_name(cfg, ecfg, opts, given):
    """A table's file name under results/: the dataset, then each typed option (`given`) that
    changes the table and the LLM's model names, as key=value; results/beauty.md is the default
    table, and no table overwrites another."""
    models = ",".join(m for m in MODELS if m in opts.models.split(","))
    _, _, chat, embed = endpoints(ecfg)  # the model names asked for, from the environment too
    now = {**vars(cfg), **vars(ecfg), "chat_model": chat * (ecfg.backend == "llm"), "embed_model":
           embed * (ecfg.embedder == "api"), "seeds": opts.seeds, "models": models,
           "ablations": opts.ablations}
    default = {**vars(Config()), **vars(EsimConfig()), **vars(CommandOptions())}
    asked = {k for k in ("chat_model", "embed_model") if now[k]}
    typed = sorted(k for k in set(given) | asked if k in now and k not in NOT_IDENTITY
                   + ("dataset",) and now[k] != default[k])
    return "-".join([cfg.dataset] + [f"{k}={now[k]}".replace("/", "_") for k in typed])

def prepare_data(cfg):
    """The processed dataset, made by data_prep.py when data_dir/dataset/ has none; SystemExit with
    one line when it cannot (a failed download, Yelp not fetched, an unknown name)."""
    if os.path.exists(os.path.join(cfg.data_dir, cfg.dataset, "sequences.txt")):
        return
    import data_prep  # only reproduce downloads; the other commands read prepared files
    if cfg.dataset not in data_prep.DATASETS:
        raise SystemExit(f"error: {os.path.join(cfg.data_dir, cfg.dataset, 'sequences.txt')} is "
                         f"missing, and data_prep.py makes only {', '.join(data_prep.DATASETS)}: "
                         "put your own sequences.txt and items.jsonl there (README: Your own "
                         "dataset) or point --data_dir at them")
    try:
        data_prep.prepare(cfg.dataset, cfg.data_dir)
    except data_prep.PrepError as e:
        raise SystemExit(f"data_prep: {e}")

def read_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)

def table_runs(cfg, ecfg, rows, seeds, given):
    """Every run of `rows` over seeds 1..seeds, each with its tuned settings (but the options in
    `given`) -> {label: [run folder per seed]}, and the runs to make by stage (backbones, ESIMs,
    EIMF runs): {stage: {folder: (command, cfg, ecfg)}}."""
    runs, stages = {}, {"backbones": {}, "ESIMs": {}, "EIMF runs": {}}
    for label, model, eimf, overrides, esim_overrides, _ in rows:
        settings = {k: v for k, v in tuned(cfg.dataset, model).items() if k not in given}
        for seed in range(1, seeds + 1):
            e = dataclasses.replace(ecfg, **esim_overrides)
            c = dataclasses.replace(cfg, model=model, seed=seed, **{**settings, **overrides},
                                    eimf=e.backend if eimf else "")
            e = resolve_esim(e) if eimf else None
            runs.setdefault(label, []).append(run_dir(c, e))
            if eimf:
                b = backbone_config(c, e)
                stages["backbones"][run_dir(b)] = ("train", b, None)
                stages["ESIMs"][esim_dir(c, e)] = ("esim", b, e)
            stages["EIMF runs" if eimf else "backbones"][runs[label][-1]] = ("train", c, e)
    return runs, stages

def make_run(job):
    """One run of a table: (command, cfg, ecfg) -> (None or the error line that stopped it, [])."""
    command, cfg, ecfg = job
    try:
        run_esim(cfg, ecfg) if command == "esim" else train(cfg, ecfg)
    except (SystemExit, *USER_ERRORS) as e:
        return error_line(e), []
    return None, []

def worker_run(job):
    """make_run in a worker process of one torch thread: its lines go to the run's log.txt, and
    its warnings back to the parent. Ctrl-C ends the worker (not only its run)."""
    torch.set_num_threads(1)
    with io.StringIO() as lines, contextlib.redirect_stdout(lines):
        try:
            error, _ = make_run(job)
        except KeyboardInterrupt:  # the run recorded it; take no next run
            os._exit(130)
        return error, [w for w in lines.getvalue().splitlines() if w.startswith("warning:")]

def make_stage(stage, jobs, workers):
    """Make the unfinished runs of one stage, one after another in this process (workers 1) or in
    `workers` processes of one thread each, with one progress line. SystemExit naming the failed
    runs once the others of the stage are made."""
    todo = {out: job for out, job in jobs.items() if not finished(out)}
    log(f"== {stage}: {len(todo)} to make, {len(jobs) - len(todo)} finished")
    if not todo:
        return
    t0, errors = time.time(), []
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        futures = {pool.submit(worker_run, job): out for out, job in todo.items()} if pool else {}
        results = ((futures[f], f.result()) for f in concurrent.futures.as_completed(futures)) \
            if pool else ((out, make_run(job)) for out, job in todo.items())
        for done, (out, (error, warnings)) in enumerate(results, 1):
            errors += [f"{out}: {error}"] if error else []
            if pool:
                if warnings:  # below the progress line, which goes on under them
                    print("\n" + "\n".join(warnings))
                left = (len(todo) - done) * (time.time() - t0) / done
                print(f"\r  {stage}: {done}/{len(todo)} ended ({workers} at once), {len(errors)} "
                      f"failed, ETA {left / 60:.0f} min   ", end="" if done < len(todo) else "\n",
                      flush=True)
    except concurrent.futures.process.BrokenProcessPool:
        raise SystemExit(f"error: a worker of stage '{stage}' ended without a word (Ctrl-C, or "
                         "killed: out of memory?); run again to resume, or lower --jobs")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if errors:
        raise SystemExit("\n".join(errors))

def plan_line(command, cfg, ecfg):
    """The bimi.py command line that makes one run: on one thread, as reproduce's workers (the
    same digits), with the options that differ from the defaults and the folders absolute (a
    scheduler may start it anywhere)."""
    words = [command]
    for obj, default in ((cfg, Config()), (ecfg, EsimConfig())):
        for key, value in dataclasses.asdict(obj).items() if obj else ():
            if key in ("data_dir", "out_dir", "cache_dir"):
                words += [f"--{key}", os.path.abspath(value)]
            elif value != getattr(default, key) and not (command == "train" and key == "backend"):
                words += [f"--{key}"] + [str(value)] * (not isinstance(value, bool))
    return f"OMP_NUM_THREADS=1 {shlex.quote(sys.executable)} " \
        f"{shlex.quote(os.path.abspath(__file__))} " + shlex.join(words)

def excludes_zero(gain):
    return gain["ci95"][0] > 0 or gain["ci95"][1] < 0

def reproduce(cfg, ecfg, opts, command_line, given=()):
    """Train every row of the table for seeds 1..opts.seeds (finished runs are reused; a stage at
    a time, in opts.jobs processes), then write results/<table_name>.md and .json: mean ± sample
    std over seeds, epochs, each EIMF row's gain with its interval, the contrasts, the
    provenance. A backbone whose gain excludes zero gets its shuffled-semantics control too.
    opts.plan: print the runs as commands instead. `given`: options the user typed (they win
    over the tuned settings)."""
    t0, load0, seeds = time.time(), os.getloadavg()[0], opts.seeds
    models = [m for m in MODELS if m in opts.models.split(",")]
    opts = dataclasses.replace(opts, jobs=opts.jobs or os.cpu_count())  # 0: one per core
    rows, runs = [], {}
    more = table_rows(ecfg.backend, models, opts.ablations)
    if opts.plan:
        print("# every run of the table, one command each, stage after stage (the runs of a stage "
              "may run side by side);\n# then the same reproduce without --plan assembles the "
              "table from the finished runs")
    while more:  # the table's rows, then the controls that its gains ask for
        more_runs, stages = table_runs(cfg, ecfg, more, seeds, given)
        for stage, jobs in stages.items():
            if opts.plan:
                print(f"# {stage}\n" + "\n".join(plan_line(*job) for job in jobs.values()))
            else:
                make_stage(stage, jobs, opts.jobs)
        if opts.plan and not all(finished(out, quiet=True) for jobs in stages.values()
                                 for out in jobs):
            return print("# once these are finished, --plan again adds the shuffled-semantics "
                         "control of any backbone whose gain excludes zero")
        rows, runs = [row for row in ROWS if row in rows or row in more], {**runs, **more_runs}
        results = table_results(ecfg, rows, runs)
        more = [row for row in table_rows(ecfg.backend, models, opts.ablations, models)
                if row not in rows and any(excludes_zero(g) for r in results if r["row"] ==
                                           f"{row[1]} + EIMF" for g in r["gain_pct"].values())]
        if more:
            log(f"the gain of {', '.join(row[1] for row in more)} + EIMF excludes zero: adding "
                "its shuffled-semantics control")
    if not opts.plan:
        write_table(cfg, ecfg, opts, table_name(cfg, ecfg, opts, given), results, command_line, t0,
                    load0)

def table_results(ecfg, rows, runs):
    """Per row: its runs' test metrics (mean and sample std over seeds), epochs, times, ESIMs;
    per EIMF row its gain over its backbone, and for a control or reference row the contrast of
    its partner over it, each with gain_interval's 95 % interval."""
    results, by_label = [], {}
    for label, model, eimf, _, esim_overrides, _ in rows:
        records = [read_json(run, "metrics.json") for run in runs[label]]
        used = read_json(runs[label][0], "config.json")["config"]  # tuned, or typed
        tests = [rec["test"] for rec in records]
        esims = [read_json(run, "config.json")["esim_dir"] for run in runs[label]] if eimf else []
        by_label[label] = r = {
            "row": label, "model": model, "eimf": eimf, "runs": runs[label], "tests": tests,
            "backend": esim_overrides.get("backend", ecfg.backend) if eimf else "",
            # sample std (n - 1): numpy's default (n) shrinks the seed spread by 18 % at 3 seeds
            "mean_std": {m: (float(np.mean([t[m] for t in tests])), float(np.std(
                [t[m] for t in tests], ddof=1)) if len(tests) > 1 else 0.0) for m in TABLE_METRICS},
            "epochs": [f"{rec['best_epoch']}/{len(rec['epochs'])}" + " cap" * (  # hit --max_epochs
                rec.get("stopped_by") == "epoch cap") for rec in records],
            "runs_s": sum(rec["total_s"] for rec in records),
            "made": [rec.get("made") for rec in records],  # provenance, per run
            "code": [rec.get("code") for rec in records],
            "settings": {k: used[k] for k in ("lr", *("lambda_align", "lambda_pred") * eimf)},
            "esim": [{"dir": d, **{k: read_json(d, "summary.json")[k] for k in (
                "typical_users", "parsed", "failures", "seconds")}} for d in esims] or None}
        results.append(r)
    per_user = {label: {m: np.stack([np.load(os.path.join(run, "test_per_user.npz"))[m]
                                     for run in r["runs"]]) for m in GAIN_METRICS}
                for label, r in by_label.items()}  # (S, U) per metric

    def gain(over, row, m):  # row's relative gain over row `over`
        g, low, high = gain_interval(per_user[over][m], per_user[row][m])
        return {"gain": g, "ci95": [low, high]}
    for r in results:
        if r["eimf"]:
            r["gain_pct"] = {m: gain(r["model"], r["row"], m) for m in GAIN_METRICS}
        partner, suffix = f"{r['model']} + EIMF", r["row"].rpartition(", ")[2]
        if suffix in CONTRASTS and partner in by_label:  # the partner row over this one
            r["contrast"] = {"what": CONTRASTS[suffix],
                             **{m: gain(r["row"], partner, m) for m in GAIN_METRICS}}
    return results

def write_table(cfg, ecfg, opts, name, results, command_line, t0, load0):
    """results/<name>.md and .json: the rows, the intervals that exclude zero, the
    contrasts, the tuned settings and the provenance (README: The table)."""
    seeds, versions, made, esim_s = opts.seeds, {}, [], {}
    settings = {}  # what the runs used, per backbone (tuned, or typed)
    for r in results:
        made += [m for m in r["made"] if m]  # where each run was trained
        for code in (c or {} for c in r["code"]):  # one code version = one bimi.py and torch
            versions.setdefault(code.get("bimi_sha256", "unrecorded"), set()).add(
                f"git {code.get('git') or 'none'}, torch {code.get('torch', 'unrecorded')}")
        esim_s.update((e["dir"], e["seconds"]) for e in r["esim"] or [])  # seeds may share one
        settings[r["model"]] = {**r["settings"], **settings.get(r["model"], {})}
    data = load_dataset(cfg.data_dir, cfg.dataset)
    popularity = popularity_metrics(make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed),
                                    data.n_items)
    if len(versions) > 1:
        log(f"warning: the table's runs come from {len(versions)} versions of bimi.py "
            f"({', '.join(versions)}); a table for a paper should come from one: remake the older "
            "runs (a fresh --out_dir)")
    cuda = resolve_device(cfg.device).type == "cuda"
    meta = {"dataset": cfg.dataset, "protocol": cfg.protocol, "seeds": seeds,
            "backend": ecfg.backend,
            "chat_model": ecfg.chat_model if ecfg.backend == "llm" else None,
            "machine": f"{os.cpu_count()} cores of {cpu_name()}, torch {torch.__version__}, "
                       + (f"CUDA {torch.cuda.get_device_name()}" if cuda else "CPU"),
            "threads": torch.get_num_threads(), "jobs": opts.jobs,
            "command": command_line, "date": time.strftime("%F"),
            "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "total_s": round(time.time() - t0, 1),
            "runs_s": round(sum(r["runs_s"] for r in results) + sum(esim_s.values()), 1),
            "code_versions": {sha: sorted(v) for sha, v in sorted(versions.items())},
            "tuned": settings, "esim_seed": ecfg.esim_seed,
            "interval": "95 %, users and seeds (README: The table)"}
    os.makedirs("results", exist_ok=True)
    write_json(f"results/{name}.json", {"meta": meta, "rows": results, "popularity": popularity})
    backend = "LLM " + ecfg.chat_model if ecfg.backend == "llm" else \
        "categories (no LLM: category paths)"
    over = f"mean ± sample std over seeds 1-{seeds}" if seeds > 1 else "seed 1"
    noise = "users and seeds" if seeds > 1 else "users only (one seed: seed noise left out)"
    lines = [f"{cfg.dataset}, protocol {cfg.protocol}, full ranking, test split, {over}; EIMF "
             f"backend: {backend}; gain: relative to the backbone, with a 95 % interval over "
             f"{noise}", "", "| row | " + " | ".join(TABLE_METRICS) + " | gain R@20 "
             "[95 % CI] | gain N@20 [95 % CI] | epochs (best/run) |", "|---" * 10 + "|"]
    for r in results:
        cells = [f"{m:.4f} ± {s:.4f}" if seeds > 1 else f"{m:.4f}"
                 for m, s in (r["mean_std"][k] for k in TABLE_METRICS)]
        cells += [interval_text(g) for g in r["gain_pct"].values()] if r["eimf"] else ["", ""]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {', '.join(r['epochs'])} |")
    lines += ["| popularity (reference floor) | " + " | ".join(
        f"{popularity[k]:.4f}" for k in TABLE_METRICS) + " | | | |", ""]
    apart = [f"{r['row']} {m[0].upper()}@20 {interval_text(g)}" for r in results if r["eimf"]
             for m, g in r["gain_pct"].items() if excludes_zero(g)]
    lines.append("Gains whose interval excludes zero: " + ("; ".join(apart) or "none") + ".")
    for r in (r for r in results if "contrast" in r):
        c = r["contrast"]
        real = next(x["gain_pct"] for x in results if x["row"] == f"{r['model']} + EIMF")
        why = verdict(real, {m: c[m] for m in GAIN_METRICS}) if "shuffled" in c["what"] else ""
        lines.append(f"{r['model']}, {c['what']}: R@20 {interval_text(c['recall@20'])}, N@20 "
                     f"{interval_text(c['ndcg@20'])}{why}.")
    lines += [f"{r['row']}: ESIM gave interests to " + ", ".join(  # a weak LLM's failures count
        f"{e['parsed']} of {e['typical_users']}" for e in {e["dir"]: e for e in r["esim"]}.values())
        + " typical users." for r in results if r["backend"] == "llm"]
    lines.append("Settings (README: Tuning; TUNED unless typed): " + "; ".join(
        f"{m} " + ", ".join(f"{k} {v}" for k, v in s.items()) for m, s in settings.items()) + ".")
    lines.append("ESIM: one per EIMF row and seed, on that seed's backbone." if not ecfg.esim_seed
                 else f"ESIM: one per EIMF row, on seed {ecfg.esim_seed}'s backbone" + (
                     ", shared by every seed (the seed spread leaves out ESIM's variance)."
                     if seeds > 1 else "."))
    made_by = "; ".join(f"bimi.py sha256 {sha} ({', '.join(v)})"
                        for sha, v in meta["code_versions"].items())
    trained = (f"{len(made)} of its {sum(len(r['runs']) for r in results)} runs trained "
               f"{min(m['date'] for m in made)} to {max(m['date'] for m in made)} "
               f"on {' / '.join(sorted({m.get('cpu', 'an unrecorded CPU') for m in made}))} with "
               f"{'/'.join(str(t) for t in sorted({m['threads'] for m in made}))} torch threads at "
               f"load {min(m['load'] for m in made):.1f}-{max(m['load'] for m in made):.1f}"
               if made else "the runs' threads and load were not recorded (older code)")
    lines.append(f"Made by `{command_line}` on {meta['date']}: {meta['machine']}, "
                 f"up to {meta['jobs']} runs at once in this invocation, load average "
                 f"{load0:.1f} at the start and "
                 f"{meta['load_average'][1]:.1f} at the end; {meta['total_s']:.0f} s for this "
                 f"invocation; {trained}; the runs took {meta['runs_s']:.0f} s to train, ESIM "
                 f"included, one after another; {made_by}.")
    with open(f"results/{name}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n\nwritten: results/{name}.md and .json")

def interval_text(g):
    if math.isnan(g["gain"]):
        return "n/a (a backbone seed scores 0)"
    return f"{g['gain']:+.1f} % [{g['ci95'][0]:+.1f}, {g['ci95'][1]:+.1f}]"

def verdict(real, contrast):
    """What the shuffled-semantics control says of the real row's gain (both metrics)."""
    if not any(excludes_zero(g) and g["gain"] > 0 for g in real.values()):
        return ": EIMF has no gain here for the semantics to explain"
    if any(excludes_zero(g) and g["gain"] > 0 for g in contrast.values()):
        return ": the real semantics beat shuffled ones"
    if all(g["gain"] <= 0 for g in contrast.values()):
        return ": the shuffled control gains as much as the real row, so the gain is not from " \
            "the semantics"
    return ": the real row's edge over the shuffled control is within noise"

def bench_one(cfg, steps=0):
    """One JSON line: seconds per training step over the first `steps` steps of an epoch (0: all;
    epoch_s extrapolates), test users ranked against the full catalogue per second, and the peak
    resident memory in MB (with the device's peak allocation on CUDA)."""
    device, t0 = resolve_device(cfg.device), time.time()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    data = load_dataset(cfg.data_dir, cfg.dataset)
    split = make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed)
    load_s = time.time() - t0
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, data.n_items).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    arrays = [torch.from_numpy(a) for a in (split.train_hist, split.train_target, split.train_user)]
    epoch_steps = math.ceil(len(arrays[1]) / cfg.batch_size)
    steps, t0 = min(steps, epoch_steps) if steps > 0 else epoch_steps, time.time()
    model.train()
    for start in range(0, steps * cfg.batch_size, cfg.batch_size):
        batch = [a[start:start + cfg.batch_size].to(device) for a in arrays]
        training_step(model, optimizer, batch, cfg)
    sync()
    step_s, t0 = (time.time() - t0) / steps, time.time()
    evaluate(model, split.test, device, cfg.eval_batch)
    sync()
    eval_s, users = time.time() - t0, len(split.test.users)
    print(json.dumps({
        "model": cfg.model, "items": data.n_items, "users": len(data.sequences),
        "protocol": cfg.protocol, "loss": cfg.loss, "load_split_s": round(load_s, 2),
        "steps": steps, "step_s": round(step_s, 4), "epoch_steps": epoch_steps,
        "epoch_s": round(step_s * epoch_steps, 1), "eval_s": round(eval_s, 2), "test_users": users,
        "users_per_s": round(users / eval_s), "device": str(device),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **(
            {"device_peak_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20)} if device.type
            == "cuda" else {})}), flush=True)

def bench(cfg, ecfg, opts, args):
    """bench_one per encoder, each in a fresh process (its own peak memory; the last of a repeated
    option wins), then k-means on the dataset's user count."""
    for model in MODELS:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "_bench_one", *args,
                                "--model", model, "--bench_steps", str(opts.bench_steps)])
        if child.returncode:  # it said why in its error line
            raise SystemExit(child.returncode)
    n_users = len(load_dataset(cfg.data_dir, cfg.dataset).sequences)
    x = torch.randn(n_users, cfg.dim, generator=torch.Generator().manual_seed(0))
    x = F.normalize(x, dim=1)
    t0 = time.time()
    kmeans(x, ecfg.clusters, ecfg.kmeans_restarts, seed=0)
    print(json.dumps({"kmeans_points": n_users, "dim": cfg.dim, "clusters": ecfg.clusters,
                      "restarts": ecfg.kmeans_restarts, "seconds": round(time.time() - t0, 2)}))

# -----------------------------------------------------------------------------
# command line: one parser for every command, checked against the dataclasses' defaults

CHOICES = {  # options with a fixed set of values
    "protocol": ("loo", "user"), "model": MODELS, "loss": ("full", "sampled"),
    "device": ("auto", "cpu", "cuda"), "eimf": ("", "categories", "llm"),
    "select_metric": ("recall@20", "ndcg@20", "recall@50", "ndcg@50"), "ablations": (0, 1),
    "backend": ("llm", "categories"), "embedder": ("api", "hash"),
    "typical": ("clustered", "random")}
ZERO_ALLOWED = ("esim_seed", "max_failed", "max_retries", "min_len", "retry_wait", "temperature",
                "lambda_align", "lambda_pred", "rlambda", "rbeta", "bench_steps", "jobs")  # or > 0
ANY_SIGN = ("seed", "split_seed")
EXPECTS = {"max_failed": "a share of the typical users, from 0 to 1",
           "models": f"backbones from {', '.join(MODELS)}, comma-separated (e.g. comirec-sa,remi)"}
OPTION_OF = {"force": ("train", "esim"), "seeds": ("reproduce",), "models": ("reproduce",),
             "ablations": ("reproduce",), "jobs": ("reproduce",), "plan": ("reproduce",),
             "bench_steps": ("bench", "_bench_one")}
SET_PER_ROW = {"model": "--models LIST", "seed": "--seeds N",  # reproduce sets these per row
               "eimf": "--backend (the EIMF rows' backend)", "shuffle": "its control rows",
               "typical": "its random-users row (--ablations 1)"}

def parse_value(key, text, default):
    """Option --key's value from its text: of the default's type, in its range, ASCII digits only
    (int() takes '٣'); SystemExit naming the option and what it expects."""
    kind = type(default)
    sign = "" if key in ANY_SIGN else " >= 0" if key in ZERO_ALLOWED else " > 0"
    if key in EXPECTS:
        expects = EXPECTS[key]
    elif key in CHOICES:
        expects = " or ".join(str(c) if kind is int else repr(c) for c in CHOICES[key])
    else:
        expects = {"": "a whole number", " >= 0": "a whole number, 0 or more",
                   " > 0": "a positive whole number"}[sign] if kind is int else "float" + sign
    try:
        value = kind(text) if kind is str or text.isascii() else None
    except ValueError:
        value = None
    if key in CHOICES:
        ok = value in CHOICES[key]
    elif kind in (int, float):
        ok = value is not None and math.isfinite(value) and (not sign or value > 0 or value == 0
                                                             and sign == " >= 0")
        ok = ok and not (key == "max_failed" and value > 1)
    else:
        ok = key != "models" or bool(text) and all(m in MODELS for m in text.split(","))
    if not ok:
        example = "" if key in EXPECTS else f" (e.g. --{key} {default!r})"
        raise SystemExit(f"error: --{key} expects {expects}{example}, got {text!r}")
    return value

def parse_overrides(args, *configs, command=None):
    """Apply --key value and --key=value (a switch such as --force takes none) to the dataclasses,
    in order (the last repeat wins) -> configs. SystemExit with one line naming the option for an
    unknown key, a missing or bad value, or an option of another command."""
    fields, i = {f.name: c for c in configs for f in dataclasses.fields(c)}, 0
    while i < len(args):
        name, eq, text = args[i].partition("=")
        key = name[2:].replace("-", "_")
        if not name.startswith("--"):
            raise SystemExit(f"error: {args[i]!r} is not an option: options come as --key value or "
                             "--key=value, and a switch (--force) takes no value; see --help")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, 1)
            raise SystemExit(f"error: unknown option {name}" + (f" (did you mean --{close[0]}?)"
                             if close else "; valid: " + ", ".join(f"--{k}" for k in fields)))
        if command and command not in OPTION_OF.get(key, (command,)):
            raise SystemExit(f"error: --{key} is an option of `{' / '.join(OPTION_OF[key])}`, not "
                             f"of `{command}`")
        default = getattr(fields[key], key)
        if isinstance(default, bool) and eq:
            raise SystemExit(f"error: --{key} is a switch: it takes no value")
        if not eq and not isinstance(default, bool):
            if i + 1 == len(args) or args[i + 1].startswith("--"):
                raise SystemExit(f"error: --{key} needs a value (e.g. --{key} {default!r})")
            i, text = i + 1, args[i + 1]
        value = True if isinstance(default, bool) else parse_value(key, text, default)
        setattr(fields[key], key, value)
        i += 1
    return configs

def options_help(cls, command=None):
    """Every field of a config as `--name  default  comment`, read from the dataclass' source."""
    lines = [f"{cls.__name__}: {cls.__doc__.splitlines()[0]}"] * (command is None)
    for m in re.finditer(r"\n\s+(\w+): \w+ = (.+?)\s+# (.*)", inspect.getsource(cls)):
        if command is None or command in OPTION_OF[m[1]]:
            lines.append(f"  --{m[1]:<18} {m[2]:<18} {m[3]}")
    return "\n".join(lines)

COMMANDS = {  # command -> what it does (the last is internal: one encoder's bench)
    "info": "load the dataset, build the split and print a summary",
    "train": "train one run (backbone, or EIMF with --eimf categories|llm)",
    "esim": "run ESIM on a backbone, training it first if needed (--model, --backend ...)",
    "bench": "per encoder: seconds per training step (--bench_steps N: the first N steps),\n"
             "             test users ranked per second, peak memory; and k-means",
    "reproduce": "every row of the results table over --seeds N (default 3)", "_bench_one": None}
USAGE = ("usage: python bimi.py COMMAND [--key value ...]   (COMMAND --help lists every option)"
         "\n\ncommands:\n" + "".join(f"  {c:<10} {text}\n" for c, text in COMMANDS.items() if text)
         + "\nEvery field of Config and EsimConfig is an option, as --key value or --key=value,"
         " e.g.\n  .venv/bin/python bimi.py train --dataset beauty --seed 1 --lr=0.003\n")

USER_ERRORS = (DataError, LLMError, TrainingError, OSError, MemoryError, RuntimeError)

def error_line(e):
    """The one line a user sees for an error of theirs (data, options, an endpoint, a folder or a
    full disk, memory). A RuntimeError other than torch's out-of-memory is a bug: raised."""
    if isinstance(e, (MemoryError, RuntimeError)):
        if not isinstance(e, MemoryError) and not re.search(
                r"out of memory|can't allocate memory", str(e)):
            raise e
        return (f"error: out of memory ({str(e).splitlines()[0][:200]}): lower --batch_size, "
                "--eval_batch or --negatives, or --jobs")
    return str(e) if str(e).startswith("error:") else f"error: {e}"

def answering(ecfg):
    """SystemExit before any training when an endpoint the run will ask does not answer at all
    (a wrong port: found now, not after the backbones have trained)."""
    ecfg = resolve_esim(ecfg)
    for url in {ecfg.base_url if ecfg.backend == "llm" else "", ecfg.embed_base_url} - {""}:
        try:
            requests.get(url + "/models", timeout=10)
        except requests.ConnectionError as e:
            raise SystemExit(f"error: nothing answers at {url} ({type(e).__name__}): start the "
                             "server, or fix the URL (OPENAI_BASE_URL, --base_url)") from None
        except requests.RequestException:
            pass  # it answers, if slowly or oddly: requests will say more

def main(argv=None):
    """`python bimi.py COMMAND [--key value ...]`: anything a user can type or bring ends in one
    `error:` line, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        return print(USAGE)
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"error: unknown command {command!r}; one of "
                         f"{', '.join(c for c in COMMANDS if COMMANDS[c])} (see --help)")
    if "-h" in args or "--help" in args:
        return print(f"usage: python bimi.py {command} [--key value ...]\n  {COMMANDS[command]}\n\n"
                     "options (--key value or --key=value), with their defaults:\n"
                     f"{options_help(Config)}\n{options_help(EsimConfig)}\n"
                     f"{options_help(CommandOptions, command)}".rstrip())
    cfg, ecfg, opts = parse_overrides(args, Config(), EsimConfig(), CommandOptions(),
                                      command=command)
    for key in SET_PER_ROW:
        if command == "reproduce" and any(a.partition("=")[0] == f"--{key}" for a in args):
            raise SystemExit(f"error: reproduce sets --{key} for each row; use {SET_PER_ROW[key]}")
    try:
        if command in ("esim", "reproduce") or command == "train" and cfg.eimf:
            backend = cfg.eimf if command == "train" else ecfg.backend
            answering(dataclasses.replace(ecfg, backend=backend))
        if command == "info":
            data = load_dataset(cfg.data_dir, cfg.dataset)
            split = make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed)
            log(split_summary(data, split, cfg.protocol))
            repeat_summary(data, split)
        elif command == "train":
            train(cfg, ecfg, force=opts.force)
        elif command == "esim":
            run_esim(cfg, ecfg, force=opts.force)
        elif command == "bench":
            bench(cfg, ecfg, opts, args)
        elif command == "_bench_one":
            bench_one(cfg, opts.bench_steps)
        elif command == "reproduce":
            resolve_esim(ecfg)  # a bad endpoint or device stops here, before a download or a run
            resolve_device(cfg.device)
            prepare_data(cfg)
            reproduce(cfg, ecfg, opts, os.environ.get("BIMI_COMMAND") or "python bimi.py "
                      + shlex.join(argv), {a.partition("=")[0][2:].replace("-", "_") for a in args
                                                        if a.startswith("--")})
    except BrokenPipeError:
        raise
    except USER_ERRORS as e:
        raise SystemExit(error_line(e))
    except KeyboardInterrupt:
        raise SystemExit("interrupted")

if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # `bimi.py train --help | head`: the reader left early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # a quiet exit flush too
        sys.exit(1)
    except KeyboardInterrupt:  # outside main's own handler
        sys.exit("interrupted")
