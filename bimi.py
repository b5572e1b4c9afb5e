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
import contextlib
import dataclasses
import email.utils
import fcntl
import functools
import hashlib
import inspect
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
    rlambda: float = 25.0           # REMI routing regularisation weight (remi only); its term sums over the batch: REMI's README uses 100 at batch 128, i.e. 25 at batch 512 (its code's default is 0); best on Beauty validation of 0 / 25 / 100
    rbeta: float = 0.1              # REMI hard-negative weights exp(rbeta * logit) (remi only); REMI's README: 10 (Books), 1 (Gowalla), 0.1 (RetailRocket); its code's default 0 is off; 0.1 best on Beauty validation of 0.1 / 1
    # training
    loss: str = "full"              # "full" softmax over all items, or "sampled" for big catalogues
    negatives: int = 1000           # shared uniform negatives per batch when loss = "sampled"
    batch_size: int = 512           # training examples per step
    lr: float = 0.006               # Adam step size for every encoder: 6x the usual 1e-3; on Beauty validation the best epochs are REMI 8, ComiRec-SA 10, DR 13, MIND 20
    max_epochs: int = 50            # a guard only: runs stop by patience (the table marks "cap" a run that reached this first)
    patience: int = 2               # epochs without validation gain before stopping (validation over all users is smooth enough)
    select_metric: str = "recall@20"  # validation metric for early stopping (or ndcg@20, recall@50, ndcg@50)
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
    esim_seed: int = 0              # backbone seed ESIM reads: 0 = each run's own seed; n = seed n's ESIM shared by all seeds
    prompt_items: int = 20          # most recent training items shown in a prompt
    hash_dim: int = 256             # width of the hashed TF-IDF vectors
    base_url: str = ""              # endpoint, e.g. http://localhost:8000/v1; empty: $OPENAI_BASE_URL
    embed_base_url: str = ""        # separate endpoint for /embeddings; empty: $OPENAI_EMBED_BASE_URL or base_url
    chat_model: str = ""            # empty: $BIMI_CHAT_MODEL or gpt-4o-mini (resolved into the saved config)
    embed_model: str = ""           # empty: $BIMI_EMBED_MODEL or text-embedding-3-small (resolved likewise)
    temperature: float = 0.0        # sampling temperature of the chat model (0: most repeatable)
    max_tokens: int = 400           # reply length cap per chat request; 4 interests in JSON take about 150 tokens
    timeout: float = 120.0          # seconds per HTTP request; a timed-out chat prompt fails that user, not re-sent
    max_retries: int = 5            # retries on connection errors, 408, 409, 429 and 5xx
    retry_wait: float = 1.0         # seconds before the first retry, doubled each time (with jitter)
    concurrency: int = 4            # requests in flight at once
    max_failed: float = 0.2         # share (0-1) of typical users that may fail before ESIM stops (their interests are left out); a small local model may need more
    embed_batch: int = 64           # texts per /embeddings request
    cache_dir: str = "cache"        # persistent request cache (one file per request)


DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL = "gpt-4o-mini", "text-embedding-3-small"
CHOICES = {  # fields with a fixed set of values, checked before anything is loaded
    "protocol": ("loo", "user"), "model": MODELS, "loss": ("full", "sampled"), "device": ("auto", "cpu", "cuda"),
    "select_metric": ("recall@20", "ndcg@20", "recall@50", "ndcg@50"), "eimf": ("", "categories", "llm"),
    "backend": ("llm", "categories"), "embedder": ("api", "hash"), "typical": ("clustered", "random"),
}
ZERO_ALLOWED = ("esim_seed", "max_failed", "max_retries", "min_len", "retry_wait", "temperature", "lambda_align",
                "lambda_pred", "rlambda", "rbeta")  # numeric options that may be 0; every other one must be positive
# Paths and batch sizes that do not change a run's results are left out of its identity; the
# device is replaced by its resolved type (CPU and CUDA runs differ in rounding).
NOT_IDENTITY = ("data_dir", "out_dir", "device", "eval_batch")
EIMF_FIELDS = ("eimf", "lambda_align", "lambda_pred", "tau", "align_batch")
REMI_FIELDS = ("rlambda", "rbeta")  # used by the remi model only
ESIM_NOT_IDENTITY = ("base_url", "embed_base_url", "timeout", "max_retries", "retry_wait", "concurrency", "cache_dir",
                     "max_failed")  # a finished ESIM's output does not depend on these


def parse_overrides(args, *configs):
    """Apply `--key value` pairs to the dataclasses. An unknown key, a value of the wrong type or
    outside CHOICES is a SystemExit with one line naming the option (before any data is read)."""
    fields = {f.name: c for c in configs for f in dataclasses.fields(c)}
    for i, flag in enumerate(args):  # a flag at the end, or followed by another flag, lacks its value
        if flag.startswith("--") and (i + 1 == len(args) or args[i + 1].startswith("--")) and i % 2 == 0:
            key = flag[2:].replace("-", "_")
            example = f"e.g. {flag} {getattr(fields[key], key)!r}" if key in fields else "see --help"
            raise SystemExit(f"error: {flag} needs a value ({example})")
    for flag in args[::2]:  # after the checks above, a pair that starts with a bare word is one word too many
        if not flag.startswith("--"):
            raise SystemExit(f"error: {flag!r} is not an option: options come in --key value pairs, "
                             "and a switch (--force) takes no value; see --help")
    for flag, text in zip(args[::2], args[1::2]):
        key = flag[2:].replace("-", "_")
        if key not in fields:
            raise SystemExit(f"error: unknown option {flag}; valid: " + ", ".join("--" + k for k in fields))
        cfg = fields[key]
        kind = type(getattr(cfg, key))
        try:
            value = kind(text)
        except ValueError:
            raise SystemExit(f"error: --{key} expects {kind.__name__}, got {text!r}") from None
        if key in CHOICES and value not in CHOICES[key]:
            raise SystemExit(f"error: --{key} must be one of {', '.join(repr(c) for c in CHOICES[key])}, got {text!r}")
        if kind in (int, float) and key not in ("seed", "split_seed") and \
                (value < 0 or (value == 0 and key not in ZERO_ALLOWED) or not math.isfinite(value)):
            raise SystemExit(f"error: --{key} must be {'0 or more' if key in ZERO_ALLOWED else 'positive'}, got {text!r}")
        if key == "max_failed" and value > 1:
            raise SystemExit(f"error: --max_failed is a share of the typical users, at most 1, got {text!r}")
        setattr(cfg, key, value)
    return configs


def options_help(*classes):
    """Every config field as `--name (default)  comment`, read from the dataclasses' source."""
    lines = []
    for cls in classes:
        lines.append(f"{cls.__name__}: {cls.__doc__.splitlines()[0]}")
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+): \w+ = (.+?)\s+# (.*)$", line)
            if m:
                lines.append(f"  --{m[1]:<18} {m[2]:<18} {m[3]}")
    return "\n".join(lines)


def identity(cfg):
    """The fields of one config that decide a run's results (paths, batch sizes of evaluation and
    endpoint URLs do not)."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY + ESIM_NOT_IDENTITY}
    if isinstance(cfg, Config) and not cfg.eimf:
        d = {k: v for k, v in d.items() if k not in EIMF_FIELDS}
    if isinstance(cfg, Config) and cfg.model != "remi":
        d = {k: v for k, v in d.items() if k not in REMI_FIELDS}
    return d


@functools.lru_cache(maxsize=None)
def _file_sha256(path, size, mtime_ns):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(paths):
    """sha256 (16 hex digits) of the files' contents, in the given order; each file is read once
    per process unless its size or modification time changes."""
    digest = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        digest.update(_file_sha256(os.path.abspath(p), st.st_size, st.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def run_identity(cfg):
    """What decides a training run's numbers: its config fields, the contents of the data files
    (not their folder) and the device type. Raises DataError if the data is missing."""
    folder = find_data(cfg.data_dir, cfg.dataset)
    data = files_digest([os.path.join(folder, "sequences.txt"), os.path.join(folder, "items.jsonl")])
    return {**identity(cfg), "data_sha256": data, "device_type": resolve_device(cfg.device).type}


@functools.lru_cache(maxsize=None)
def code_version():
    """The code that makes a run: sha256 of bimi.py (12 hex digits), and the git commit of the
    checkout when there is one ("+dirty" when bimi.py or prompts/ differ from it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.abspath(__file__), "rb") as f:
        version = {"bimi_sha256": hashlib.sha256(f.read()).hexdigest()[:12], "git": None}
    try:
        git = ["git", "-C", here]
        commit = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(git + ["diff", "--quiet", "HEAD", "--", "bimi.py", "prompts"], timeout=10)
            version["git"] = commit.stdout.strip() + ("+dirty" if dirty.returncode else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return version


@contextlib.contextmanager
def folder_lock(folder, log=print):
    """Exclusive use of a run or ESIM folder by one process. A second reproduction started in the
    same place waits here, then reuses what the first finished; the OS drops the lock when its
    process ends, so a crash or kill never leaves a stale lock (POSIX flock)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is making {folder}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def short_hash(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def warn_other_code(folder, made_by, log=print, _warned=set()):
    """One warning line, once per process and older version, when a reused run was made by
    another version of bimi.py (its numbers may differ from what this code would give)."""
    made_by = made_by or {}
    if made_by.get("bimi_sha256") == code_version()["bimi_sha256"]:
        return
    old = made_by.get("git") or made_by.get("bimi_sha256", "unrecorded code")
    if old not in _warned:
        _warned.add(old)
        log(f"warning: reusing runs made by other code ({old} vs {code_version()['git'] or code_version()['bimi_sha256']}"
            f" now), e.g. {folder}; `train --force` or a fresh --out_dir remakes them")


def write_json(path, obj):
    """Atomic: a reader sees the old file or the new one, never half of it (nor a temporary file
    left behind when writing fails). Readable by all, as the other files of a run."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_atomic(state, path):
    """torch.save through a temporary file, so that an interrupt never leaves half a model."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def resolve_device(name):
    """"auto" -> CUDA when present, else the CPU. Raises SystemExit for "cuda" without CUDA."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but this torch has no usable CUDA device; use --device cpu")
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
    repeating: int = 0  # sequences in which some item occurs more than once (Yelp's repeat visits)

    @property
    def n_items(self):
        return len(self.titles) - 1


def find_data(data_dir, name):
    """<data_dir>/<name>, the folder holding sequences.txt and items.jsonl; DataError naming the
    first missing file and the data_prep.py command that writes both."""
    folder = os.path.join(data_dir, name)
    for file in ("sequences.txt", "items.jsonl"):
        if not os.path.exists(os.path.join(folder, file)):
            raise DataError(f"{folder}/{file} not found: run `python data_prep.py {name}`, which writes "
                            "sequences.txt and items.jsonl (or pass --data_dir ../shared/data where the "
                            "benchmark is shared)")
    return folder


def read_text_lines(path):
    """The lines of a UTF-8 text file as editors save it: a byte-order mark and trailing blank lines
    are dropped (a blank line in the middle stays, for the caller to name); CRLF line ends are left
    to the parsers, which skip the CR. DataError when the file is not UTF-8."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read().rstrip()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); save it as UTF-8 or regenerate it with "
                        "data_prep.py") from None
    return text.split("\n") if text else []


def load_dataset(data_dir, name):
    """Read and validate sequences.txt and items.jsonl (format: ../shared/data/README.md).

    DataError names the file and line of anything malformed. Also counts the sequences that repeat
    an item (Dataset.repeating); repeat_summary tells what that does to evaluation."""
    folder = find_data(data_dir, name)
    items_path, seq_path = os.path.join(folder, "items.jsonl"), os.path.join(folder, "sequences.txt")
    titles, categories = [""], [[]]
    for line_no, line in enumerate(read_text_lines(items_path), 1):
        try:
            item = json.loads(line)
            item_id, title, cats = item["item_id"], item["title"], item["categories"]
        except (ValueError, KeyError, TypeError) as e:
            if not line.strip():
                raise DataError(f"{items_path}:{line_no}: blank line; remove it (one item per line)") from None
            raise DataError(f"{items_path}:{line_no}: not an item record ({e}); "
                            "regenerate it with data_prep.py") from None
        if item_id != line_no:
            raise DataError(f"{items_path}:{line_no}: item_id {item_id}, expected {line_no}: "
                            "item ids must be contiguous from 1 in file order; regenerate with data_prep.py")
        titles.append(title)
        categories.append(cats)
    n_items = len(titles) - 1
    sequences = []
    for line_no, line in enumerate(read_text_lines(seq_path), 1):
        try:
            ids = np.array(line.split(), dtype=np.int64)
        except ValueError:
            raise DataError(f"{seq_path}:{line_no}: non-integer token; "
                            "expected `user_id item_id item_id ...`") from None
        if len(ids) < 2:
            if not len(ids):
                raise DataError(f"{seq_path}:{line_no}: blank line; remove it (one user per line)")
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
    # one sort of (user, item) keys finds every repeat: 20 ms on Yelp, where np.unique per user takes 100
    owner = np.repeat(np.arange(len(sequences)), [len(q) for q in sequences])
    keys = np.sort(owner * (n_items + 1) + np.concatenate(sequences))
    repeating = len(np.unique(keys[1:][keys[1:] == keys[:-1]] // (n_items + 1)))
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


def targets_in_history(evalset, n_items):
    """(targets that also occur in their user's history, all targets) of an EvalSet, by one sorted
    membership test of (row, item) keys rather than a loop over users."""
    row = np.arange(len(evalset.users))[:, None] * (n_items + 1)
    seen = (row + evalset.seen)[evalset.seen > 0]
    real = evalset.targets > 0
    return int(np.isin((row + evalset.targets)[real], seen).sum()), int(real.sum())


def repeat_summary(data, split, log=print):
    """Log ONE warning line when users come back to items, and return the counts as a dict.

    A validation or test target that is already in the user's history is masked out of the
    ranking with the rest of the history (score_items), so no model can hit it and recall is
    capped below 1: on the shared Yelp, 6.7 % of leave-one-out test targets (5.4 % of validation
    targets). Amazon's 5-core files have no repeats, and then nothing is logged."""
    valid_hits, valid_n = targets_in_history(split.valid, data.n_items)
    test_hits, test_n = targets_in_history(split.test, data.n_items)
    if data.repeating or valid_hits or test_hits:
        log(f"WARNING: {data.name}: {data.repeating:,} of {len(data.sequences):,} sequences repeat an item; "
            f"{valid_hits:,} of {valid_n:,} validation targets ({100 * valid_hits / valid_n:.1f} %) and "
            f"{test_hits:,} of {test_n:,} test targets ({100 * test_hits / test_n:.1f} %) are already in the "
            "user's history, which is masked from the ranking, so no model can hit them")
    return {"repeating_sequences": data.repeating, "valid_in_history": valid_hits, "valid_targets": valid_n,
            "test_in_history": test_hits, "test_targets": test_n}


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


def kmeans(x, k, n_init=4, seed=0, max_iter=100, tol=1e-4, log=print):
    """Best of n_init runs (lowest inertia); fully determined by the seed. x: (n, d) float tensor.
    Returns centroids (k', d), assignment (n,), inertia, with k' = k, or the number of distinct
    points when that is smaller (a warning is logged: k-means cannot make more distinct clusters).
    Raises ValueError for a non-finite point or no points."""
    if not len(x) or not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(1).sum()) if len(x) else 0
        raise ValueError(f"k-means needs finite points: got {len(x)} points, {bad} with NaN or inf")
    distinct = len(torch.unique(x, dim=0))
    if distinct < k:
        log(f"warning: {distinct} distinct points for {k} clusters: using {distinct} clusters")
        k = distinct
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
    """A request that failed for good. The message names the endpoint, the model and the server's
    own words (the API key redacted). `per_user` is True when the failure concerns one prompt (a
    refused or over-long prompt, a reply with no answer, retries spent): ESIM then counts that
    user as failed and goes on; False when no other request can succeed either (bad key, unknown
    model or URL, quota spent, server unreachable, a configuration error): ESIM stops at once."""

    def __init__(self, message, per_user=False):
        super().__init__(message)
        self.per_user = per_user


class FormatRejected(LLMError):
    """The server refused the request's `response_format` (the client retries without it)."""


class Reply(str):
    """The assistant's text of a chat reply, with `finish_reason` ("stop", "length", ...)."""
    finish_reason = "stop"


def redact(text, secret):
    return text.replace(secret, "***") if secret else text


def retry_after_seconds(headers, now=None):
    """Seconds the server asks us to wait, or None: `Retry-After` as seconds or an HTTP-date
    (RFC 9110 section 10.2.3), else OpenAI's `x-ratelimit-reset-requests/-tokens` ("1s", "6m0s",
    "20ms"). Values in [0, 60] are used as given, up to an hour is clamped to 60 s; a negative,
    NaN or absurd value gives None (the caller's own backoff)."""
    value = None
    text = (headers.get("Retry-After") or "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(text)
                value = when.timestamp() - (time.time() if now is None else now)
            except (TypeError, ValueError, IndexError):
                value = None
    else:
        resets = []
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
            m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:([\d.]+)s)?(?:(\d+)ms)?", (headers.get(name) or "").strip())
            if m and any(m.groups()):
                h, mins, s, ms = (float(g) if g else 0.0 for g in m.groups())
                resets.append(3600 * h + 60 * mins + s + ms / 1000)
        value = max(resets) if resets else None
    if value is None or not math.isfinite(value) or value < 0 or value > 3600:
        return None
    return min(value, 60.0)


def endpoints(ecfg):
    """(base URL, embeddings base URL, chat model, embedding model): each from its option, else its
    environment variable ($OPENAI_BASE_URL, $OPENAI_EMBED_BASE_URL (else the base URL),
    $BIMI_CHAT_MODEL, $BIMI_EMBED_MODEL), else the default model names. Surrounding spaces and a
    trailing slash are dropped."""
    base = (ecfg.base_url or os.environ.get("OPENAI_BASE_URL", "")).strip().rstrip("/")
    embed_base = (ecfg.embed_base_url or os.environ.get("OPENAI_EMBED_BASE_URL", "")).strip().rstrip("/") or base
    chat_model = (ecfg.chat_model or os.environ.get("BIMI_CHAT_MODEL") or DEFAULT_CHAT_MODEL).strip()
    embed_model = (ecfg.embed_model or os.environ.get("BIMI_EMBED_MODEL") or DEFAULT_EMBED_MODEL).strip()
    return base, embed_base, chat_model, embed_model


def check_endpoints(ecfg, chat, embed):
    """Configuration errors before the first request: a missing endpoint, a URL without http:// or
    https://, an empty model name. Raises LLMError with one line naming the option or variable and
    an example value. chat / embed: whether chat and /embeddings requests will be made."""
    base, embed_base, chat_model, embed_model = endpoints(ecfg)
    url_fix = ", or use --backend categories --embedder hash (no LLM)"
    checks = []  # (value, where it comes from, what it is for, example, extra advice)
    if chat:
        checks += [(base, "--base_url" if ecfg.base_url else "OPENAI_BASE_URL", "the chat endpoint (--backend llm)",
                    "http://localhost:8000/v1", url_fix),
                   (chat_model, "--chat_model (or BIMI_CHAT_MODEL)", "a chat model name", "gpt-4o-mini", "")]
    if embed:
        source = ("--embed_base_url" if ecfg.embed_base_url else
                  "OPENAI_EMBED_BASE_URL" if os.environ.get("OPENAI_EMBED_BASE_URL", "").strip() else
                  "--base_url" if ecfg.base_url else "OPENAI_BASE_URL")
        checks += [(embed_base, source, "an embeddings endpoint (--embedder api)", "http://localhost:8000/v1", url_fix),
                   (embed_model, "--embed_model (or BIMI_EMBED_MODEL)", "an embedding model name",
                    "text-embedding-3-small", "")]
    for value, name, what, example, advice in checks:
        if not value:
            raise LLMError(f"{name} is empty but {what} is needed: set it, e.g. {example}{advice}")
        if "url" in name.lower() and not re.match(r"https?://[^/\s]+", value):
            raise LLMError(f"{name} is {value!r}: it needs http:// or https:// and a host, e.g. {example}")


QUOTA_WORDS = re.compile(r"quota|billing|credit|insufficient_funds|payment", re.I)
BATCH_WORDS = re.compile(r"batch|too (?:large|many|long)|at most \d+|limit|entity", re.I)
FORMAT_WORDS = re.compile(r"response_format|json_schema|schema|grammar", re.I)
RESPONSE_FORMATS = (  # structured output, in the shapes servers accept, tried in this order
    lambda schema: {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
    lambda schema: {"type": "json_object", "schema": schema},  # llama.cpp's and llama-cpp-python's servers
)


class LLMClient:
    """Chat and embedding requests to an OpenAI-compatible endpoint (OpenAI, vLLM, Ollama's /v1,
    llama.cpp's server, LM Studio, gateways), with retries, a persistent cache of valid answers only,
    and errors that carry the server's own words. Built from a resolved EsimConfig (see
    `resolve_esim`); the key comes from $OPENAI_API_KEY and is never printed, logged, cached or saved."""

    def __init__(self, ecfg, log=print):
        self.cfg, self.log = ecfg, log
        self.base, self.embed_base, self.chat_model, self.embed_model = endpoints(ecfg)
        self._key = os.environ.get("OPENAI_API_KEY", "").strip()
        self.cache_dir = os.path.join(ecfg.cache_dir, "llm")
        self.requests = self.cache_hits = 0
        self._lock = threading.Lock()
        self._serial = threading.Lock()    # held around each request once a timeout showed a serial server
        self.serial = False
        self.formats = list(RESPONSE_FORMATS)  # response_format shapes still to try, best first
        self._warned = set()
        self._rng = random.Random(0)  # jitter only

    def _warn_once(self, key, msg):
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        self.log(f"warning: {msg}")

    def _failure(self, base, path, status, body, text, payload):
        """Turn an error reply into (retryable?, LLMError). status: HTTP status or the `code` of an
        error object inside a 200 reply; body: the parsed JSON or None; text: the raw body."""
        url, model = base + path, payload["model"]
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            words = str(error.get("message") or error)
            kind = " ".join(str(error.get(k) or "") for k in ("type", "code"))
        else:
            words, kind = (str(error) if error else text.strip()[:300]) or "(empty body)", ""
        where = f"{url} (model {model})"
        words = " ".join(words.split())[:400]  # one line, even for a server that sends its traceback
        said = redact(f"HTTP {status}: {words}", self._key)
        embeddings = path == "/embeddings"
        if payload.get("response_format") and FORMAT_WORDS.search(words) and (status in (400, 422) or status >= 500):
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
            hint = (f"; the base URL {base} should end in /v1 (e.g. {base}/v1)" if not re.search(r"/v\d+$", base)
                    else "; check the base URL and the model name (--chat_model / --embed_model, "
                         "or BIMI_CHAT_MODEL / BIMI_EMBED_MODEL)")
            return False, LLMError(f"{where}: not found: {said}{hint}")
        if embeddings and (status == 413 or BATCH_WORDS.search(words)):
            return False, LLMError(f"{where}: {said}; the batch is too large for this server: "
                                   f"lower --embed_batch (now {self.cfg.embed_batch}), e.g. --embed_batch 8")
        if status in (400, 413, 422) and not embeddings:  # this prompt: content filter, context length
            return False, LLMError(f"{where} refused this prompt: {said}", per_user=True)
        return False, LLMError(f"{where} refused the request: {said}")

    def _post(self, base, path, payload):
        """POST one JSON request; returns the JSON reply (a dict without an `error` object).
        Retries connection errors, 408/409/429 and 5xx with exponential backoff (or the server's
        Retry-After); stops early when the same 5xx message comes twice (no retry can fix it).
        A timeout is not re-sent (a serial local server would still be working on it): it fails
        this request, and later requests go one at a time. Raises LLMError only."""
        url = base + path
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = "Bearer " + self._key
        model, last = payload["model"], None
        for attempt in range(self.cfg.max_retries + 1):
            wait = None
            with self._lock:
                self.requests += 1
            try:
                with self._serial if self.serial else contextlib.nullcontext():
                    r = requests.post(url, json=payload, headers=headers, timeout=self.cfg.timeout)
            except requests.Timeout:
                if not self.serial:
                    self.serial = True
                    self.log(f"  {url}: no reply within --timeout {self.cfg.timeout:g} s; sending one request "
                             "at a time from now on (a local server answers one prompt after another)")
                raise LLMError(f"{url} (model {model}): no reply within --timeout {self.cfg.timeout:g} s; "
                               "not re-sent (the server may still be working on it): raise --timeout",
                               per_user=True) from None
            except requests.ConnectionError as e:
                error = LLMError(f"{url} (model {model}): cannot connect ({type(e).__name__}); is the server running?")
            except requests.RequestException as e:  # invalid URL, too many redirects, broken stream ...
                raise LLMError(f"{url} (model {model}): {redact(str(e), self._key)}") from None
            else:
                text = r.text
                try:
                    body = r.json()
                except ValueError:
                    body = None
                if r.status_code == 200 and isinstance(body, dict) and "error" not in body:
                    return body
                if r.status_code == 200 and not isinstance(body, dict):
                    kind = r.headers.get("Content-Type", "")
                    raise LLMError(f"{url} (model {model}) answered HTTP 200 with a body that is not a JSON object "
                                   f"({kind or 'no Content-Type'}): {redact(text.strip()[:200], self._key)!r}"
                                   + ("; the kit asks for \"stream\": false, so this server ignores it"
                                      if "event-stream" in kind or text.lstrip().startswith("data:") else
                                      "; is the base URL an OpenAI-compatible /v1 endpoint?"))
                status = r.status_code
                if status == 200:  # an error object inside a 200 reply (gateways): judged by its code
                    code = body["error"].get("code") if isinstance(body["error"], dict) else None
                    status = int(code) if str(code).isdigit() else (429 if "rate" in str(body["error"]).lower() else 400)
                retryable, error = self._failure(base, path, status, body, text, payload)
                if not retryable:
                    raise error
                if str(error) == last and status >= 500:  # the same 5xx twice: deterministic
                    raise LLMError(f"{error} (the same answer twice: not retried further)", error.per_user)
                last = str(error)
                wait = retry_after_seconds(r.headers)
            if attempt == self.cfg.max_retries:
                raise LLMError(f"giving up after {attempt + 1} attempts: {error}", error.per_user)
            if wait is None:
                wait = min(self.cfg.retry_wait * 2.0 ** attempt, 60.0) * (0.5 + self._rng.random())
            self.log(f"  {error}; retrying in {wait:.1f} s")
            time.sleep(wait)

    def _cached(self, kind, base, payload, extract):
        """The reply for `payload`, from the cache or the server. `extract(body)` validates a reply
        and returns (value, cacheable); it raises LLMError for a reply with no answer, which is never
        cached, so a fixed server is asked again on the next run."""
        key = hashlib.sha256(json.dumps([kind, base, payload], sort_keys=True).encode()).hexdigest()
        path = os.path.join(self.cache_dir, key[:2], key + ".json")
        if os.path.exists(path):
            with open(path) as f:
                with self._lock:
                    self.cache_hits += 1
                return json.load(f)["reply"]
        body = self._post(base, "/" + kind, payload)
        served = body.get("model")
        if isinstance(served, str) and served and not served.startswith(payload["model"]) \
                and not payload["model"].startswith(served):
            self._warn_once(("model", kind), f"{base}/{kind} asked for model {payload['model']!r} "
                                             f"answers as {served!r}; the run records the name asked for")
        value, cacheable = extract(body)
        if cacheable:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_json(path, {"reply": value, "model": served if isinstance(served, str) else "", "kind": kind})
        return value

    def chat(self, messages, schema=None):
        """The assistant's reply (a `Reply`, i.e. a str with .finish_reason) to a list of
        {"role", "content"} messages. `schema`: a JSON schema the answer should follow, sent as
        `response_format` in the first shape the server accepts (OpenAI/vLLM/Ollama "json_schema",
        then llama.cpp's "json_object" + schema, then none; remembered for the client's life).
        Raises LLMError (per_user) for a reply with no answer: no choices, content null or not
        text, or cut by max_tokens before any text; those and length-cut replies are not cached."""
        check_endpoints(self.cfg, chat=True, embed=False)
        while True:
            payload = {"model": self.chat_model, "messages": messages, "temperature": self.cfg.temperature,
                       "max_tokens": self.cfg.max_tokens, "stream": False}
            shape = self.formats[0] if schema and self.formats else None
            if shape:
                payload["response_format"] = shape(schema)
            try:
                answer = self._cached("chat/completions", self.base, payload, self._chat_answer)
                reply = Reply(answer["text"])
                reply.finish_reason = answer["finish_reason"]
                return reply
            except FormatRejected as e:
                with self._lock:
                    if self.formats and self.formats[0] is shape:
                        self.formats.pop(0)
                        self.log(f"  {e}; trying {'its next shape' if self.formats else 'without it'}")

    def _chat_answer(self, body):
        url = f"{self.base}/chat/completions (model {self.chat_model})"
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LLMError(f"{url} answered with no choices (an output filter?): "
                           f"{redact(json.dumps(body)[:200], self._key)}", per_user=True)
        message, finish = choices[0].get("message") or {}, choices[0].get("finish_reason")
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content as parts: [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict)
                              and isinstance(p.get("text"), str)) if all(isinstance(p, dict) for p in content) else None
        cut = finish == "length"
        if not isinstance(content, str) or (cut and not content.strip()):
            reason = ("cut by max_tokens before any answer: raise --max_tokens (now "
                      f"{self.cfg.max_tokens}) or shorten the prompt (--prompt_items)" if cut else
                      f"content is {type(content).__name__}, not text")
            raise LLMError(f"{url}: no answer in the reply ({reason})", per_user=True)
        return {"text": content, "finish_reason": finish or "stop"}, not cut

    def embed(self, texts):
        """L2-normalised (len(texts), D) float32 array, sent in batches of embed_batch. A reply with
        the wrong number of vectors, vectors of unequal width or a non-finite number is rejected
        (LLMError naming the text) and not cached."""
        def extract(batch):
            def check(body):
                data = body.get("data")
                if not isinstance(data, list) or len(data) != len(batch):
                    raise LLMError(f"{self.embed_base}/embeddings (model {self.embed_model}) returned "
                                   f"{len(data) if isinstance(data, list) else 'no'} vectors for {len(batch)} texts; "
                                   "if the server embeds one text per request, use --embed_batch 1")
                try:
                    rows = [d["embedding"] for d in sorted(data, key=lambda d: d["index"])] \
                        if all("index" in d for d in data) else [d["embedding"] for d in data]
                    vectors = np.array(rows, dtype=np.float64)
                except (KeyError, TypeError, ValueError) as e:
                    raise LLMError(f"{self.embed_base}/embeddings (model {self.embed_model}) answered in an "
                                   f"unexpected shape ({type(e).__name__}: {e}); is it OpenAI-compatible?") from None
                if vectors.ndim != 2 or not vectors.shape[1]:
                    raise LLMError(f"{self.embed_base}/embeddings (model {self.embed_model}) returned vectors of "
                                   "unequal or zero width")
                bad = np.flatnonzero(~np.isfinite(vectors).all(1))
                if len(bad):
                    raise LLMError(f"{self.embed_base}/embeddings (model {self.embed_model}) returned NaN or inf "
                                   f"for {len(bad)} text(s), e.g. {batch[bad[0]]!r}; not cached")
                return rows, True
            return check

        def one(batch):
            payload = {"model": self.embed_model, "input": batch}
            return self._cached("embeddings", self.embed_base, payload, extract(batch))

        check_endpoints(self.cfg, chat=False, embed=True)
        batches = [texts[i:i + self.cfg.embed_batch] for i in range(0, len(texts), self.cfg.embed_batch)]
        with concurrent.futures.ThreadPoolExecutor(self.cfg.concurrency) as pool:
            vectors = [v for out in pool.map(one, batches) for v in out]
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


def interests_schema(n_interests):
    """The JSON schema of an answer, sent as the request's response_format (METHOD.md section 4.4)."""
    interest = {"type": "object", "additionalProperties": False, "required": ["name", "description"],
                "properties": {"name": {"type": "string"}, "description": {"type": "string"}}}
    return {"type": "object", "additionalProperties": False, "required": ["interests"],
            "properties": {"interests": {"type": "array", "items": interest,
                                         "minItems": n_interests, "maxItems": n_interests}}}


PLACEHOLDER = re.compile(r"^\W*$|<[^<>]*>|^\.\.\.|\.\.\.$")  # empty, "...", "<one sentence>": copied from a template


def parse_interests(text, n_interests):
    """The interests [(name, description)] of a reply: the LAST JSON object with an "interests"
    list after any <think>...</think> block (a reasoning model drafts JSON while thinking), with
    code fences or prose around it. Raises ParseError for a wrong count, a placeholder copied from
    the prompt ("...", "<2 to 5 words>"), or the same name twice."""
    text = text or ""
    if "<think>" in text and "</think>" not in text:
        raise ParseError("the reply stops inside its <think> block; no answer after it")
    text = text.rsplit("</think>", 1)[-1]
    decoder = json.JSONDecoder()
    found = None
    for start in [m.start() for m in re.finditer(r"\{", text)]:
        try:
            obj = decoder.raw_decode(text, start)[0]
        except ValueError:
            continue
        if isinstance(obj, dict) and "interests" in obj:
            found = obj
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
        name, description = name.strip(), description.strip()
        if PLACEHOLDER.search(name) or (description and PLACEHOLDER.search(description)):
            raise ParseError(f"interest {k + 1} copies a placeholder of the prompt ({name!r}: {description!r}); "
                             "write a real name and description")
        if name.lower() in {n.lower() for n, _ in out}:
            raise ParseError(f"interest {k + 1} repeats the name {name!r}; give {n_interests} distinct interests")
        out.append((name, description))
    return out


def llm_interests(client, data, train_seq, n_interests, max_items):
    """One chat request (asking for the JSON schema), plus one repair request that quotes the parse
    error and at most 300 characters of the reply (a reply cut by max_tokens is not quoted, so the
    repair fits the context). Raises ParseError if both fail, LLMError from the client."""
    messages = render_prompt(data, train_seq, n_interests, max_items)
    schema = interests_schema(n_interests)
    reply = client.chat(messages, schema)
    try:
        return parse_interests(reply, n_interests)
    except ParseError as e:
        error = str(e) + ("; the reply was cut by max_tokens, so be brief" if reply.finish_reason == "length" else "")
        quoted = "(cut)" if reply.finish_reason == "length" else reply[:300]
        repair = load_prompt("repair.txt").substitute(error=error, n_interests=n_interests)
        reply = client.chat(messages + [{"role": "assistant", "content": quoted},
                                        {"role": "user", "content": repair}], schema)
        try:
            return parse_interests(reply, n_interests)
        except ParseError as e:
            raise ParseError(f"{e}; the repaired reply began {reply[:200]!r}") from None


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
    """Interests (name, description) of each typical user, or None for a user that failed: a reply
    that could not be parsed after the repair, or a per-user LLMError (a refused prompt, a reply
    with no answer, spent retries). Failures go to out/failures.jsonl and are never cached, so a
    rerun asks only for them. Prompts and interests are saved in `out`.
    Raises LLMError for a failure no other request can escape (bad key, unknown model or URL),
    and SystemExit as soon as more than ecfg.max_failed (a share) of the users have failed."""
    limit = int(ecfg.max_failed * len(typical))
    stop, lock, fatal, failures = threading.Event(), threading.Lock(), [], []

    def work(n):  # the interests of typical user n, or None (and the failure recorded)
        if stop.is_set():  # the run is over: more than `limit` failures, or a fatal error
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
            return None

    if ecfg.backend == "llm":
        with open(os.path.join(out, "prompts.jsonl"), "w") as f:
            for t in typical:
                messages = render_prompt(data, split.train_seqs[t["user"]], ecfg.semantic_interests, ecfg.prompt_items)
                f.write(json.dumps({"user": t["user"], "messages": messages}) + "\n")
    progress = Progress(len(typical), client)
    results = [None] * len(typical)
    with concurrent.futures.ThreadPoolExecutor(ecfg.concurrency if ecfg.backend == "llm" else 1) as pool:
        futures = {pool.submit(work, n): n for n in range(len(typical))}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            if not stop.is_set():
                progress.step(failed=results[futures[future]] is None)
    failures.sort(key=lambda x: x["user"])
    with open(os.path.join(out, "failures.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in failures)
    if fatal:
        raise fatal[0]
    if len(failures) > limit:
        print()
        raise SystemExit(f"error: {len(failures)} of {len(typical)} typical users failed (more than --max_failed "
                         f"{ecfg.max_failed:g}), first: "
                         f"{failures[0]['error'][:300]} (all in {out}/failures.jsonl); fix the endpoint, model or "
                         "prompts/ (or allow more with --max_failed) and run again: answers so far are cached")
    with open(os.path.join(out, "interests.jsonl"), "w") as f:
        for t, interests in zip(typical, results):
            if interests:
                f.write(json.dumps({"user": t["user"], "interests": [
                    {"name": a, "description": b} for a, b in interests]}) + "\n")
    return results, failures


def semantic_labels(vectors, owner, clusters_of_typical, assign, n_clusters, n_prototypes, seed, restarts, log=print):
    """METHOD.md section 4.6: prototypes by k-means over the interest vectors; a typical user's
    multi-hot label over prototypes; a behaviour cluster's label is the mean over its typical users;
    each user inherits its cluster's. Returns prototypes (P, D), labels (n, P), labelled (n,); P is
    n_prototypes, or fewer when there are fewer distinct interest texts (kmeans caps it)."""
    prototypes, text_proto, _ = kmeans(torch.from_numpy(vectors), n_prototypes, restarts, seed=seed, log=log)
    n_prototypes = len(prototypes)
    multi_hot = np.zeros((len(clusters_of_typical), n_prototypes), dtype=np.float32)
    multi_hot[owner, text_proto.numpy()] = 1
    cluster_label = np.zeros((n_clusters, n_prototypes), dtype=np.float32)
    cluster_count = np.zeros(n_clusters)
    np.add.at(cluster_label, clusters_of_typical, multi_hot)
    np.add.at(cluster_count, clusters_of_typical, 1)
    cluster_label /= np.maximum(cluster_count, 1)[:, None]
    return prototypes.numpy(), cluster_label[assign], cluster_count[assign] > 0


def resolve_esim(ecfg):
    """The EsimConfig a run records and hashes: endpoints and model names resolved from the
    environment (endpoints()), and the model name a backend does not use blanked. Raises LLMError
    for a bad endpoint or model name (check_endpoints), before any request or training."""
    llm, api = ecfg.backend == "llm", ecfg.embedder == "api"
    check_endpoints(ecfg, chat=llm, embed=api)
    base, embed_base, chat_model, embed_model = endpoints(ecfg)
    return dataclasses.replace(ecfg, base_url=base if llm or api else "", embed_base_url=embed_base if api else "",
                               chat_model=chat_model if llm else "", embed_model=embed_model if api else "")


def esim_identity(cfg, ecfg):
    """What decides an ESIM run's output: its backbone run, its resolved config, and for the llm
    backend the prompt templates' contents. ecfg must be resolved (resolve_esim)."""
    backbone_cfg = dataclasses.replace(cfg, eimf="", seed=ecfg.esim_seed or cfg.seed)
    prompts = files_digest(sorted(os.path.join(PROMPTS, p) for p in os.listdir(PROMPTS) if p.endswith(".txt")))
    return {"backbone": run_identity(backbone_cfg), "esim": identity(ecfg),
            "prompts_sha256": prompts if ecfg.backend == "llm" else None}


def run_esim(cfg, ecfg, log=print):
    """ESIM (METHOD.md section 4) on the backbone run of `cfg` with seed ecfg.esim_seed, or cfg.seed
    when that is 0 (each seed's own backbone, so an EIMF row's seed spread includes ESIM's).
    Trains the backbone if needed; a finished ESIM of the same identity is reused. Returns its folder."""
    ecfg = resolve_esim(ecfg)
    seed = ecfg.esim_seed or cfg.seed
    backbone_cfg = dataclasses.replace(cfg, eimf="", seed=seed)
    backbone_dir = train(backbone_cfg, log=log)
    ident = esim_identity(cfg, ecfg)
    out = os.path.join(cfg.out_dir, cfg.dataset,
                       f"esim-{cfg.model}-{cfg.protocol}-{ecfg.backend}-{ecfg.embedder}-s{seed}-{short_hash(ident)}")
    with folder_lock(out, log):
        return esim_locked(cfg, ecfg, backbone_cfg, backbone_dir, ident, out, log)


def esim_locked(cfg, ecfg, backbone_cfg, backbone_dir, ident, out, log):
    """run_esim() once this process holds the ESIM folder `out`."""
    seed = backbone_cfg.seed
    if os.path.exists(os.path.join(out, "summary.json")):
        with open(os.path.join(out, "summary.json")) as f:
            warn_other_code(out, json.load(f).get("code"), log)
        log(f"reusing ESIM run {out}")
        return out
    write_json(os.path.join(out, "config.json"), {**ident, "esim_config": dataclasses.asdict(ecfg)})
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
    centroids, assign, inertia = kmeans(reps, ecfg.clusters, ecfg.kmeans_restarts, seed=seed, log=log)
    n_clusters = len(centroids)
    log(f"k-means: {len(users):,} users into {n_clusters} clusters in {time.time() - t1:.1f} s "
        f"(inertia {inertia:.1f})")
    if ecfg.typical == "clustered":
        chosen = select_typical(reps, assign, centroids, lengths, ecfg.per_cluster, ecfg.min_len)
    else:  # ablation: as many users, drawn at random
        rows = np.random.default_rng(seed).choice(len(users), min(len(users), n_clusters * ecfg.per_cluster),
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
    if not kept:
        raise SystemExit(f"error: no typical user got interests (see {out}/failures.jsonl)")
    texts = [f"{name}: {desc}" for n in kept for name, desc in results[n]]
    owner = np.array([row for row, n in enumerate(kept) for _ in results[n]])  # kept-user row of each text
    vectors = client.embed(texts) if ecfg.embedder == "api" else hash_embed(texts, ecfg.hash_dim)

    # semantic prototypes and labels; rows of `labels` are user ids
    prototypes, user_labels, user_labelled = semantic_labels(
        vectors, owner, np.array([typical[n]["cluster"] for n in kept]), assign.cpu().numpy(), n_clusters,
        ecfg.prototypes, seed, ecfg.kmeans_restarts, log)
    labels = np.zeros((len(data.sequences) + 1, len(prototypes)), dtype=np.float32)
    labelled = np.zeros(len(data.sequences) + 1, dtype=bool)
    labels[users], labelled[users] = user_labels, user_labelled
    width = max(len(results[n]) for n in kept)
    semantic = np.zeros((len(kept), width, vectors.shape[1]), dtype=np.float32)  # (typical, K_s, D)
    semantic_mask = np.zeros((len(kept), width), dtype=bool)
    for row in range(len(kept)):
        texts_of_row = vectors[owner == row]
        semantic[row, :len(texts_of_row)] = texts_of_row
        semantic_mask[row, :len(texts_of_row)] = True
    # typical users with the same set of interest texts form one group (not each other's InfoNCE negatives)
    first_seen = {}
    group = np.array([first_seen.setdefault(tuple(sorted(results[n])), len(first_seen)) for n in kept])
    np.savez(os.path.join(out, "esim.npz"), typical_users=np.array([typical[n]["user"] for n in kept]),
             semantic=semantic, semantic_mask=semantic_mask, semantic_group=group, prototypes=prototypes,
             labels=labels, labelled=labelled, vectors=vectors)
    summary = {"typical_users": len(typical), "parsed": len(kept), "failures": len(failures),
               "texts": len(texts), "text_dim": int(vectors.shape[1]),
               "labelled_users": int(labelled.sum()), "train_users": len(users),
               "mean_label_mass": float(labels[users].sum(1).mean()), "seconds": round(time.time() - t0, 1),
               "prototypes": len(prototypes), "clusters": n_clusters,
               "typical_with_a_twin": int((np.bincount(group)[group] > 1).sum()),
               "requests": client.requests if client else 0, "cache_hits": client.cache_hits if client else 0,
               "code": code_version()}
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


def alignment_loss(interests, semantic, semantic_mask, tau, group=None):
    """Late-interaction InfoNCE between typical users' behavioural interests (B, K, d) and their
    projected semantic interests (B, J, d): sim(u, w) = mean_j max_k cos(s_wj, v_uk), symmetric
    (METHOD.md section 5). group (B,): typical users whose semantic sets are identical share a
    group and are not each other's negatives (their texts cannot tell them apart)."""
    v, s = F.normalize(interests, dim=-1), F.normalize(semantic, dim=-1)
    cos = torch.einsum("ukd,wjd->uwjk", v, s).amax(-1)                     # (B, B, J)
    m = semantic_mask.float().unsqueeze(0)
    sim = (cos * m).sum(-1) / m.sum(-1)                                    # (B users, B semantic owners)
    labels = torch.arange(len(v), device=v.device)
    if group is not None:
        twins = (group.unsqueeze(0) == group.unsqueeze(1)) & (labels.unsqueeze(0) != labels.unsqueeze(1))
        sim = sim.masked_fill(twins, -torch.inf)
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
    """runs/<dataset>/<model>-<protocol>[-eimf-<backend>]-s<seed>-<hash of the run's identity>;
    ecfg (resolved) is needed for an EIMF run."""
    ident = run_identity(cfg)
    name = f"{cfg.model}-{cfg.protocol}"
    if cfg.eimf:
        ident = {"train": ident, "esim": esim_identity(cfg, ecfg)}
        name += f"-eimf-{cfg.eimf}"
    return os.path.join(cfg.out_dir, cfg.dataset, f"{name}-s{cfg.seed}-{short_hash(ident)}")


class Semantics:
    """ESIM's outputs as tensors, plus the text-to-behaviour head P_s (kept beside the model)."""

    def __init__(self, esim_dir, split, cfg, device):
        z = np.load(os.path.join(esim_dir, "esim.npz"))
        t = lambda a: torch.from_numpy(z[a]).to(device)
        self.semantic, self.semantic_mask, self.semantic_group = t("semantic"), t("semantic_mask"), t("semantic_group")
        self.prototypes, self.labels, self.labelled = t("prototypes"), t("labels"), t("labelled").float()
        self.typical_hist = torch.from_numpy(
            last_items([split.train_seqs[int(u)] for u in z["typical_users"]], cfg.max_len)).to(device)
        self.head = nn.Linear(self.semantic.shape[-1], cfg.dim).to(device)

    def loss(self, model, interests, users, cfg, gen):
        """lambda_align * L_align (a side batch of typical users) + lambda_pred * L_pred (this batch)."""
        pick = torch.randperm(len(self.typical_hist), generator=gen)[:cfg.align_batch].to(users.device)
        typical_interests = model(self.typical_hist[pick])[0]
        align = alignment_loss(typical_interests, self.head(self.semantic[pick]), self.semantic_mask[pick], cfg.tau,
                               self.semantic_group[pick])
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


class TrainingError(Exception):
    """A run that cannot go on (a non-finite loss); recorded as failed, never reused."""


class Log:
    def __init__(self, path=None):
        self.path = path

    def __call__(self, msg):
        print(msg, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def train(cfg, ecfg=None, force=False, log=print):
    """Train (or reuse) one run; returns its folder. EIMF runs build their ESIM first. A run is
    reused only when its metrics.json says "done" (a failed or interrupted run is trained again).
    Raises TrainingError when the loss becomes NaN or infinite (the run is recorded as failed)."""
    ecfg = resolve_esim(dataclasses.replace(ecfg or EsimConfig(), backend=cfg.eimf)) if cfg.eimf else None
    out = run_dir(cfg, ecfg)
    with folder_lock(out, log):
        return train_locked(cfg, ecfg, out, force, log)


def train_locked(cfg, ecfg, out, force, log):
    """train() once this process holds the run folder `out` (ecfg resolved, None for a backbone)."""
    metrics_path = os.path.join(out, "metrics.json")
    if not force and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            finished = json.load(f)
        if finished.get("status") == "done":
            warn_other_code(out, finished.get("code"), log)
            log(f"reusing finished run {out}")
            return out
    esim_dir = run_esim(cfg, ecfg, log) if cfg.eimf else None
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "log.txt")):
        os.remove(os.path.join(out, "log.txt"))
    log = Log(os.path.join(out, "log.txt"))
    saved = {"config": dataclasses.asdict(cfg), "esim": dataclasses.asdict(ecfg) if cfg.eimf else None,
             "esim_dir": esim_dir, "identity": run_identity(cfg), "code": code_version()}
    write_json(os.path.join(out, "config.json"), saved)
    device = resolve_device(cfg.device)
    t0 = time.time()
    data = load_dataset(cfg.data_dir, cfg.dataset)
    split = make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed)
    log(split_summary(data, split, cfg.protocol))
    repeat_summary(data, split, log)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, data.n_items).to(device)
    semantics = Semantics(esim_dir, split, cfg, device) if cfg.eimf else None
    params = list(model.parameters()) + (list(semantics.head.parameters()) if semantics else [])
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    shuffle = torch.Generator().manual_seed(cfg.seed)   # batch order
    sampler = torch.Generator().manual_seed(cfg.seed + 1)  # negatives and typical-user batches
    hist, target, user = (torch.from_numpy(a) for a in (split.train_hist, split.train_target, split.train_user))
    record = {"status": "running", "epochs": [], "best_epoch": 0, "valid": None, "test": None,
              "code": code_version()}
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
                loss = training_step(model, optimizer, batch, cfg, sampler, semantics)
                if not math.isfinite(loss):
                    record.update(status="failed", error=f"loss {loss} at epoch {epoch}, step {steps + 1}")
                    write_json(metrics_path, record)
                    raise TrainingError(f"{out}: the training loss became {loss} at epoch {epoch}, step {steps + 1}; "
                                        "the run is recorded as failed. Lower --lr, or check ESIM's outputs "
                                        "for NaN (esim.npz) if this is an EIMF run")
                total += loss
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
        best = f"the best model so far is {out}/model.pt" if best_state else "no epoch finished"
        log(f"interrupted: {len(record['epochs'])} epochs recorded in {metrics_path}; {best}; "
            "run again to restart this run")
        raise
    if bad_epochs < cfg.patience:
        log(f"stopped by --max_epochs {cfg.max_epochs} before patience ({cfg.patience}) did: the tables mark this run "
            "'cap'; raise --max_epochs to train it to convergence")
    model.load_state_dict(best_state)
    t_test = time.time()
    model.eval()
    per_user = evaluate_per_user(functools.partial(score_items, model), split.test, device, cfg.eval_batch)
    # per-user test metrics beside metrics.json: the table's paired bootstrap resamples users
    np.savez_compressed(os.path.join(out, "test_per_user.npz"), users=split.test.users,
                        **{k: v.astype(np.float32) for k, v in per_user.items() if k.split("@")[0] != "hitrate"})
    record["test"] = {k: float(v.mean()) for k, v in per_user.items()}
    record.update(status="done", stopped_by="patience" if bad_epochs >= cfg.patience else "epoch cap",
                  test_s=round(time.time() - t_test, 2), total_s=round(time.time() - t0, 1), device=str(device))
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


ROWS = [  # (row label, model, EIMF on?, config overrides, ESIM overrides, group): METHOD.md section 6
    *[(m, m, False, {}, {}, "main") for m in MODELS],
    *[(f"{m} + EIMF", m, True, {}, {}, "main") for m in MODELS],
    ("comirec-sa + EIMF w/o alignment", "comirec-sa", True, {"lambda_align": 0.0}, {}, "ablation"),
    ("comirec-sa + EIMF w/o prediction", "comirec-sa", True, {"lambda_pred": 0.0}, {}, "ablation"),
    ("comirec-sa + EIMF, random users", "comirec-sa", True, {}, {"typical": "random"}, "ablation"),
    # the no-LLM reference beside an LLM table (without an LLM it would repeat "comirec-sa + EIMF")
    ("comirec-sa + EIMF, categories backend", "comirec-sa", True, {}, {"backend": "categories", "embedder": "hash"},
     "llm reference"),
]
TABLE_METRICS = ("recall@20", "ndcg@20", "hitrate@20", "recall@50", "ndcg@50", "hitrate@50")


GAIN_METRICS = ("recall@20", "ndcg@20")


def paired_bootstrap(backbone, eimf, resamples=2000, seed=0):
    """Relative gain of EIMF over its backbone with a 95 % paired bootstrap interval over users.
    backbone, eimf: (S, U) per-user test metrics of S seeds (the same seed = the same encoder
    initialisation and batch order). Per user, the EIMF-minus-backbone difference is averaged over
    the seeds; users are resampled with replacement (numpy's PCG64 with `seed`), and each resample's
    gain is mean(difference) / mean(backbone). Returns (gain %, low %, high %): the gain of the full
    sample and the 2.5th and 97.5th percentiles of the resampled gains (percentile method)."""
    backbone, eimf = np.asarray(backbone, dtype=np.float64), np.asarray(eimf, dtype=np.float64)
    base = backbone.mean(0)                                     # (U,)
    diff = (eimf - backbone).mean(0)                            # (U,)
    rng = np.random.default_rng(seed)
    gains = np.empty(resamples)
    for start in range(0, resamples, 100):                      # (100, U) indices at a time: bounded memory
        idx = rng.integers(0, len(diff), size=(min(100, resamples - start), len(diff)))
        gains[start:start + len(idx)] = diff[idx].mean(1) / base[idx].mean(1)
    low, high = np.percentile(gains, [2.5, 97.5])
    return float(100 * diff.mean() / base.mean()), float(100 * low), float(100 * high)


def table_rows(backend, models, ablations):
    """The rows of one table: the backbones in `models` and their EIMF rows; the ComiRec-SA
    ablations when `ablations` (and comirec-sa is among the models); with the llm backend, the
    categories-backend row as the no-LLM reference."""
    wanted = {"main", "ablation"} if ablations else {"main"}
    if backend == "llm":
        wanted.add("llm reference")
    return [row for row in ROWS if row[1] in models and row[5] in wanted]


def esim_summary(run):
    """What the ESIM behind an EIMF run gave: its folder, typical users, how many got interests
    (parsed) and how many failed, and the seconds it took, from its summary.json."""
    with open(os.path.join(run, "config.json")) as f:
        esim_dir = json.load(f)["esim_dir"]
    with open(os.path.join(esim_dir, "summary.json")) as f:
        summary = json.load(f)
    return {"dir": esim_dir, **{k: summary[k] for k in ("typical_users", "parsed", "failures", "seconds")}}


def table_name(dataset, backend, models, ablations):
    """The file name (no extension) of a table under results/: the dataset, "-llm" for the llm
    backend, then the backbones when not all four and "-no-ablations", so that a partial table never
    overwrites the whole one."""
    return (dataset + ("-llm" if backend == "llm" else "") + ("" if list(models) == list(MODELS) else "-" + "+".join(models))
            + ("" if ablations or "comirec-sa" not in models else "-no-ablations"))


def prepare_data(cfg):
    """reproduce's first step, once every option has been checked: the processed dataset, made by
    data_prep.py (beside this file) when data_dir/dataset/ has none. SystemExit with one line when
    data_prep cannot make it (a download that failed, Yelp's files not fetched by hand, a name it
    does not know)."""
    if os.path.exists(os.path.join(cfg.data_dir, cfg.dataset, "sequences.txt")):
        return
    import data_prep  # only reproduce downloads; the kit's other commands read prepared files
    if cfg.dataset not in data_prep.DATASETS:
        raise SystemExit(f"error: {os.path.join(cfg.data_dir, cfg.dataset, 'sequences.txt')} is missing, and data_prep.py "
                         f"makes only {', '.join(data_prep.DATASETS)}: put your own sequences.txt and items.jsonl there "
                         "(format: README, 'Troubleshooting') or point --data_dir at them")
    try:
        data_prep.prepare(cfg.dataset, cfg.data_dir)
    except data_prep.PrepError as e:
        raise SystemExit(f"data_prep: {e}")


def reproduce(cfg, ecfg, seeds, models=MODELS, ablations=True):
    """Train every row of the table (METHOD.md section 6; table_rows) for seeds 1..seeds
    (finished runs are reused), then write results/<table_name>.md and .json: mean ± sample std
    over seeds, the epochs each run trained, each EIMF row's gain with its paired bootstrap
    interval, the code versions the rows came from, the seconds the runs took to train."""
    t0 = time.time()
    rows = table_rows(ecfg.backend, models, ablations)
    runs = {label: [] for label, *_ in rows}
    for seed in range(1, seeds + 1):  # seed-major: a whole first table appears early
        for label, model, eimf, overrides, esim_overrides, _ in rows:
            e = dataclasses.replace(ecfg, **esim_overrides)
            c = dataclasses.replace(cfg, model=model, seed=seed, eimf=e.backend if eimf else "", **overrides)
            print(f"== {label}, seed {seed}", flush=True)
            runs[label].append(train(c, e))
    results, code_versions, runs_total_s = [], {}, 0.0
    for label, model, eimf, overrides, esim_overrides, _ in rows:
        backend = dataclasses.replace(ecfg, **esim_overrides).backend if eimf else ""
        records = []
        for r in runs[label]:
            with open(os.path.join(r, "metrics.json")) as f:
                records.append(json.load(f))
            runs_total_s += records[-1]["total_s"]
            # one code version = one bimi.py: commits that change only the README keep the table whole
            version = records[-1].get("code") or {}
            code_versions.setdefault(version.get("bimi_sha256", "unrecorded"), set()).add(version.get("git") or "no git")
        tests = [rec["test"] for rec in records]
        # sample std (n - 1): numpy's default (n) would shrink the seed spread by 18 % at 3 seeds
        stats = {m: (float(np.mean([t[m] for t in tests])),
                     float(np.std([t[m] for t in tests], ddof=1)) if len(tests) > 1 else 0.0)
                 for m in TABLE_METRICS}
        results.append({"row": label, "model": model, "eimf": eimf, "backend": backend, "runs": runs[label],
                        "tests": tests, "mean_std": stats,
                        # "cap": the run reached --max_epochs before patience stopped it
                        "epochs": [f"{rec['best_epoch']}/{len(rec['epochs'])}"
                                   + (" cap" if rec.get("stopped_by") == "epoch cap" else "") for rec in records],
                        "esim": [esim_summary(r) for r in runs[label]] if eimf else None})
    esim_s = {e["dir"]: e["seconds"] for r in results for e in r["esim"] or []}  # seeds may share an ESIM
    data = load_dataset(cfg.data_dir, cfg.dataset)
    popularity = popularity_metrics(make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed), data.n_items)
    backbone = {r["model"]: r for r in results if not r["eimf"]}
    for r in results:
        if r["eimf"]:
            r["gain_pct"] = {}
            for m in GAIN_METRICS:
                per_user = [np.stack([np.load(os.path.join(run, "test_per_user.npz"))[m] for run in row["runs"]])
                            for row in (backbone[r["model"]], r)]
                gain, low, high = paired_bootstrap(*per_user)
                r["gain_pct"][m] = {"gain": gain, "ci95": [low, high]}
    if len(code_versions) > 1:
        print(f"warning: the table's runs come from {len(code_versions)} versions of bimi.py ({', '.join(code_versions)}); "
              "a table for a paper should come from one: remake the older runs (a fresh --out_dir)")
    meta = {"dataset": cfg.dataset, "protocol": cfg.protocol, "seeds": seeds, "backend": ecfg.backend,
            "chat_model": ecfg.chat_model if ecfg.backend == "llm" else None,
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
                       f"{'CUDA ' + torch.cuda.get_device_name() if resolve_device(cfg.device).type == 'cuda' else 'CPU'}",
            "date": time.strftime("%Y-%m-%d"), "total_s": round(time.time() - t0, 1),
            "runs_s": round(runs_total_s + sum(esim_s.values()), 1),
            "code_versions": {sha: sorted(gits) for sha, gits in sorted(code_versions.items())},
            "esim_seed": ecfg.esim_seed, "bootstrap": "95 % paired, 2,000 user resamples, seed 0"}
    name = table_name(cfg.dataset, ecfg.backend, models, ablations)
    os.makedirs("results", exist_ok=True)
    write_json(os.path.join("results", f"{name}.json"), {"meta": meta, "rows": results,
                                                                 "popularity": popularity})
    backend_name = ("LLM " + ecfg.chat_model if ecfg.backend == "llm" else "categories (no LLM: category paths)")
    over_seeds = f"mean ± sample std over seeds 1-{seeds}" if seeds > 1 else "seed 1 (one seed: no seed spread)"
    lines = [f"{cfg.dataset}, protocol {cfg.protocol}, full ranking, test split, {over_seeds}; EIMF backend: "
             f"{backend_name}; gain: relative to the backbone, with its 95 % paired bootstrap interval over users",
             "", "| row | " + " | ".join(TABLE_METRICS) + " | gain R@20 [95 % CI] | gain N@20 [95 % CI] | epochs (best/run) |",
             "|---" * (len(TABLE_METRICS) + 4) + "|"]
    for r in results:
        cells = [f"{m:.4f} ± {s:.4f}" if seeds > 1 else f"{m:.4f}" for m, s in (r["mean_std"][k] for k in TABLE_METRICS)]
        gains = [f"{g['gain']:+.1f} % [{g['ci95'][0]:+.1f}, {g['ci95'][1]:+.1f}]"
                 for g in (r["gain_pct"][m] for m in GAIN_METRICS)] if r["eimf"] else ["", ""]
        lines.append(f"| {r['row']} | " + " | ".join(cells + gains) + f" | {', '.join(r['epochs'])} |")
    lines.append("| popularity (reference floor) | " + " | ".join(f"{popularity[k]:.4f}" for k in TABLE_METRICS)
                 + " | | | |")
    lines.append("")
    for r in results:  # what each LLM row's ESIM gave: a weak model's failed users carry no interests
        if r["eimf"] and r["backend"] == "llm":
            esims = {e["dir"]: e for e in r["esim"]}.values()
            lines.append(f"{r['row']}: ESIM gave interests to " + ", ".join(
                f"{e['parsed']} of {e['typical_users']}" for e in esims) + " typical users.")
    lines.append("ESIM: one per EIMF row and seed, on that seed's backbone." if not ecfg.esim_seed else
                 f"ESIM: one per EIMF row, on seed {ecfg.esim_seed}'s backbone"
                 + (", shared by every seed (the seed spread leaves out ESIM's variance)." if seeds > 1 else "."))
    versions = "; ".join(f"bimi.py sha256 {sha} (git {', '.join(gits)})" for sha, gits in meta["code_versions"].items())
    lines.append(f"{meta['machine']}; {meta['date']}; the runs took {meta['runs_s']:.0f} s to train, ESIM included, one "
                 f"after another; {meta['total_s']:.0f} s for this invocation; {versions}.")
    with open(os.path.join("results", f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


COMMANDS = {  # command -> what it does (the last is internal: one encoder's bench in a fresh process)
    "info": "load the dataset, build the split and print a summary",
    "train": "train one run (backbone, or EIMF with --eimf categories|llm)",
    "esim": "run ESIM for a trained backbone (--model, --backend, --embedder ...)",
    "bench": "per encoder: seconds per training step (--bench_steps N: the first N steps of an epoch;\n"
             "             default the whole epoch), test users ranked per second, peak memory; and k-means",
    "reproduce": "every row of the results table over --seeds N (default 3)",
    "_bench_one": None}
COMMAND_OPTIONS = [  # (the commands that take it, option, default, default as --help shows it, what it does)
    (("train",), "--force", False, "", "train again even if a finished run exists"),
    (("reproduce",), "--seeds", 3, "3", "seeds 1..N of every row"),
    (("reproduce",), "--models", ",".join(MODELS), "all four",
     "backbones in the table, comma-separated, e.g. comirec-sa,remi"),
    (("reproduce",), "--ablations", 1, "1", "0 leaves out the ComiRec-SA ablation rows"),
    (("bench", "_bench_one"), "--bench_steps", 0, "0", "training steps timed per encoder (0: a whole epoch)")]
USAGE = ("usage: python bimi.py COMMAND [--key value ...]   (python bimi.py COMMAND --help lists every option)\n\n"
         "commands:\n" + "".join(f"  {c:<10} {text}\n" for c, text in COMMANDS.items() if text) + """
Every field of Config and EsimConfig is an option (see the top of bimi.py), e.g.
  python bimi.py train --dataset beauty --model comirec-sa --seed 1 --lr 0.003
""")


def main(argv=None):
    """The command line: `python bimi.py COMMAND [--key value ...]`. Anything a user can type or
    bring ends in one `error:` line, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"error: unknown command {command!r}; one of {', '.join(c for c in COMMANDS if COMMANDS[c])} "
                         "(see --help)")
    if "-h" in args or "--help" in args:
        print(f"usage: python bimi.py {command} [--key value ...]\n  {COMMANDS[command]}\n\n"
              "options (--key value), with their defaults:\n"
              + options_help(Config, EsimConfig)
              + "".join(f"\n  {flag:<20} {shown:<18} {what}" for commands, flag, _, shown, what in COMMAND_OPTIONS
                        if command in commands))
        return
    extra = {flag: (commands, default) for commands, flag, default, _, _ in COMMAND_OPTIONS}
    values = {}
    for flag, (commands, default) in extra.items():
        if flag in args and command not in commands:
            raise SystemExit(f"error: {flag} is an option of `{' / '.join(commands)}`, not of `{command}`")
        values[flag] = default
        while flag in args:  # the last one wins
            i = args.index(flag)
            if flag == "--force":
                values[flag] = True
                del args[i]
                continue
            text = args[i + 1] if i + 1 < len(args) else ""
            if flag == "--models":
                if not text or any(m not in MODELS for m in text.split(",")):
                    raise SystemExit(f"error: --models takes backbones from {', '.join(MODELS)}, comma-separated "
                                     f"(e.g. --models comirec-sa,remi), got {text!r}")
                values[flag] = text
            elif not re.fullmatch("[0-9]+", text) or (flag == "--seeds" and int(text) < 1) or \
                    (flag == "--ablations" and int(text) > 1):  # ASCII digits: str.isdigit takes '²' too
                expected = {"--seeds": "a positive whole number (e.g. --seeds 3)", "--ablations": "0 or 1",
                            "--bench_steps": "a whole number (e.g. --bench_steps 50)"}[flag]
                raise SystemExit(f"error: {flag} expects {expected}, got {text!r}")
            else:
                values[flag] = int(text)
            del args[i:i + 2]
    per_row = {"--model": "--models LIST", "--seed": "--seeds N", "--eimf": "--backend (the EIMF rows' backend)"}
    set_by_reproduce = [flag for flag in per_row if flag in args] if command == "reproduce" else []
    if set_by_reproduce:  # reproduce sets these for each row of the table
        raise SystemExit(f"error: reproduce sets {set_by_reproduce[0]} for each row; use {per_row[set_by_reproduce[0]]}")
    cfg, ecfg = parse_overrides(args, Config(), EsimConfig())
    try:
        if command == "info":
            data = load_dataset(cfg.data_dir, cfg.dataset)
            split = make_split(data, cfg.protocol, cfg.max_len, cfg.split_seed)
            print(split_summary(data, split, cfg.protocol))
            repeat_summary(data, split)
        elif command == "train":
            train(cfg, ecfg, force=values["--force"])
        elif command == "esim":
            run_esim(cfg, ecfg)
        elif command == "bench":
            steps = str(values["--bench_steps"])
            for model in MODELS:  # one process each: its own peak memory
                subprocess.run([sys.executable, os.path.abspath(__file__), "_bench_one", *args, "--model", model,
                                "--bench_steps", steps], check=True)
            bench_kmeans(cfg, ecfg)
        elif command == "_bench_one":
            bench_one(cfg, values["--bench_steps"])
        elif command == "reproduce":
            resolve_esim(ecfg)  # a bad endpoint or model name stops here, not after the backbones have trained
            prepare_data(cfg)
            reproduce(cfg, ecfg, values["--seeds"], [m for m in MODELS if m in values["--models"].split(",")],
                      bool(values["--ablations"]))
    except (DataError, LLMError, TrainingError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("interrupted")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # `python bimi.py train --help | head`: the reader left early, nothing went wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit flush is quiet too
        sys.exit(1)
