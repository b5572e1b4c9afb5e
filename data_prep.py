"""
Download and process the benchmark datasets into bimi's format.

    python data_prep.py beauty|sports|toys|yelp|synthetic [--out data] [--raw-dir DIR]
    python data_prep.py synthetic --users 100000 --items 367982 --out /tmp/books  # Books-size

Writes <out>/<dataset>/sequences.txt (one line per user: `user_id item_id item_id ...`, oldest
first, ids from 1) and items.jsonl (`{"item_id", "asin", "title", "categories"}` per item).
Amazon 2014 5-core files are downloaded with requests; Yelp must be fetched by hand (its licence
needs a click-through); `synthetic` is generated offline with planted topics for the demo and tests.
"""
import argparse
import ast
import gzip
import html
import itertools
import json
import os
import random
import sys
import tempfile
import time
import zlib

import requests

AMAZON = {"beauty": "Beauty", "sports": "Sports_and_Outdoors", "toys": "Toys_and_Games"}
DATASETS = (*AMAZON, "yelp", "synthetic")  # what this script can make
# The 2014 release (McAuley et al.), tried in order; the first that answers with the file wins.
MIRRORS = [
    "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/",
    "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/",
]
KNOWN_SIZES = {  # users, items, interactions (README: Protocol)
    "beauty": (22363, 12101, 198502), "sports": (35598, 18357, 296337),
    "toys": (19412, 11924, 167597), "yelp": (30431, 20033, 316354),
}
YELP_FILES = ("yelp_academic_dataset_review.json", "yelp_academic_dataset_business.json")
# The benchmark's year, both bounds inclusive and compared as date strings, as the S3-Rec and P5
# processing does (aHuiWang/CIKM2020-S3Rec data/data_process.py): a review on 31 Dec 2019 after
# midnight is out. Every star rating is kept, and so are repeat visits.
YELP_SINCE, YELP_UNTIL = "2019-01-01 00:00:00", "2019-12-31 00:00:00"
GZIP_MAGIC = b"\x1f\x8b"
CORE = 5  # every user and every item keeps at least this many interactions


class PrepError(Exception):
    """Bad input: the message names the file, the line and what to do."""


# -----------------------------------------------------------------------------
# download

def download(url_names, dest):
    """Fetch one gzip file to `dest`, trying each mirror; a complete earlier download is reused.

    A mirror that answers with anything but gzip data (a moved-dataset HTML page, a login or proxy
    page) is refused from its first bytes and nothing is kept; PrepError when no mirror delivers."""
    if os.path.exists(dest):
        print(f"reusing {dest}")
        return dest
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    errors = []
    for url in url_names:
        part = dest + ".part"  # never the final name until the last byte is on disk
        try:
            with requests.get(url, stream=True, timeout=60) as r:
                r.raise_for_status()
                total = int(r.headers.get("Content-Length", 0))
                done, t0, last, head = 0, time.time(), 0.0, b""
                with open(part, "wb") as f:
                    for chunk in r.iter_content(1 << 20):
                        if len(head) < len(GZIP_MAGIC):  # a 200 answer can be a web page
                            head += chunk[:16]
                            if len(head) >= len(GZIP_MAGIC) and not head.startswith(GZIP_MAGIC):
                                raise IOError(not_gzip(r, head))
                        f.write(chunk)
                        done += len(chunk)
                        if time.time() - last > 1:
                            last = time.time()
                            rate = done / max(last - t0, 1e-9) / 1e6
                            of = f" of {total / 1e6:.1f}" if total else ""
                            print(f"\r  {os.path.basename(dest)}: {done / 1e6:.1f}{of} MB, "
                                  f"{rate:.1f} MB/s", end="", flush=True)
                if total and done != total:
                    raise IOError(f"connection closed after {done} of {total} bytes")
                if len(head) < len(GZIP_MAGIC):
                    raise IOError(not_gzip(r, head))
            print(f"\r  {os.path.basename(dest)}: {done / 1e6:.1f} MB in "
                  f"{time.time() - t0:.0f} s" + " " * 20)
            os.replace(part, dest)
            return dest
        except (requests.RequestException, IOError) as e:
            errors.append(f"{url}: {e}")
            if os.path.exists(part):
                os.remove(part)
    raise PrepError(f"could not download {os.path.basename(dest)} ({'; '.join(errors)}); "
                    "fetch it by hand into a folder FOLDER, run `.venv/bin/python data_prep.py "
                    "DATASET --raw-dir FOLDER` (with --out DIR for another data folder) and then "
                    "the reproduction again")


def not_gzip(response, head):
    """Why a download is refused, from the Content-Type and the first bytes of the body."""
    kind = response.headers.get("Content-Type", "no Content-Type")
    return (f"answered with {kind} starting {head!r}, not gzip data (the link has moved or a web "
            "page answered)")


# -----------------------------------------------------------------------------
# raw parsers

def is_gzip(path):
    """True when the file starts with gzip's magic bytes. Never trust the name: browsers unpack a
    .gz on download and keep the name, and some mirrors serve unpacked files under .gz names."""
    with open(path, "rb") as f:
        return f.read(len(GZIP_MAGIC)) == GZIP_MAGIC


def read_lines(path, parse):
    """Yield (line_no, record) from a file of one record per line, gzipped or not (by its first
    bytes); blank lines are skipped. PrepError names the file and line of anything unreadable."""
    opener = gzip.open if is_gzip(path) else open
    line_no = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield line_no, parse(line)
                except (ValueError, SyntaxError) as e:
                    raise PrepError(f"{path}:{line_no}: malformed record ({type(e).__name__}: "
                                    f"{e}); the file is damaged: delete it and download it "
                                    "again") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise PrepError(f"{path}: truncated or corrupt gzip after line {line_no} ({e}); "
                        "delete it and run again to download a fresh copy") from None
    except UnicodeDecodeError as e:
        raise PrepError(f"{path}: line {line_no + 1} is neither UTF-8 text nor gzip data ({e}); "
                        "delete it and fetch the file again") from None


def parse_meta_line(line):
    """2014 meta lines are Python dict literals (single quotes), not JSON: never eval them. A JSON
    line (null, true: a later release) is read too, so that its release can be named."""
    try:
        record = ast.literal_eval(line)
    except (ValueError, SyntaxError):
        record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a dict literal")
    return record


def read_amazon_reviews(path):
    """(user, item, time, line_no) per review of a 2014 `reviews_*_5.json.gz` file."""
    rows = []
    for line_no, r in read_lines(path, json.loads):
        try:
            rows.append((r["reviewerID"], r["asin"], int(r["unixReviewTime"]), line_no))
        except (KeyError, TypeError, ValueError) as e:
            raise PrepError(f"{path}:{line_no}: review lacks reviewerID/asin/unixReviewTime ({e}); "
                            "is this a 2014 reviews_*_5.json.gz file?") from None
    return rows


def clean_text(text):
    """HTML entities decoded; UTF-16 surrogate pairs (Python 2's narrow builds wrote emoji so)
    joined into one character, a lone half replaced by U+FFFD, so that the text is valid UTF-8."""
    return html.unescape(text).encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def read_amazon_meta(path, wanted):
    """asin -> (title, category paths) for the asins in `wanted` (clean_text)."""
    meta = {}
    for line_no, m in read_lines(path, parse_meta_line):
        paths = m.get("categories", [])
        if {"category", "main_cat", "main_category"} & set(m) or not isinstance(paths, list) or \
                any(not isinstance(p, list) for p in paths):
            raise PrepError(f"{path}:{line_no}: a record of a later release of the Amazon dumps "
                            f"(fields {', '.join(sorted(m))[:120]}): the benchmark is the 2014 "
                            "release, whose categories are lists of paths; get its meta_*.json.gz")
        asin = m.get("asin")
        if asin in wanted:
            cats = [[clean_text(c) for c in p] for p in m.get("categories", []) if p]
            meta[asin] = (clean_text(m.get("title", "") or "").strip(), cats)
    return meta


def yelp_categories(value):
    """Category paths of one business: [["Food"], ["Coffee & Tea"]]. Dumps since 2019 store a comma
    string, older ones a JSON list, and some businesses have null. ValueError for anything else."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ValueError(f"categories is {type(value).__name__}, expected a string, a list or null")
    return [[c.strip()] for c in value if c.strip()]


def read_yelp(raw_dir):
    """(user, business, date, line_no) per review of the benchmark's year, and business_id ->
    (name, category paths) for the reviewed businesses. PrepError when no review is of that year."""
    review_path, business_path = (os.path.join(raw_dir, f) for f in YELP_FILES)
    rows, latest = [], ""
    for line_no, r in read_lines(review_path, json.loads):
        try:
            user, item, date = r["user_id"], r["business_id"], r["date"]
            kept = YELP_SINCE <= date <= YELP_UNTIL  # "YYYY-MM-DD HH:MM:SS" compare as times
        except (KeyError, TypeError) as e:
            raise PrepError(f"{review_path}:{line_no}: review lacks user_id/business_id/date "
                            f"({e})") from None
        if kept:
            rows.append((user, item, date, line_no))
        elif date > latest:
            latest = date
    if not rows:
        raise PrepError(f"{review_path}: no review dated {YELP_SINCE} to {YELP_UNTIL}, the "
                        f"benchmark's year (the latest review here is {latest or 'none'}); use a "
                        "Yelp Open Dataset release that covers 2019 (https://www.yelp.com/dataset)")
    wanted = {r[1] for r in rows}
    meta = {}
    for line_no, b in read_lines(business_path, json.loads):
        if b.get("business_id") in wanted:
            try:
                cats = yelp_categories(b.get("categories"))
            except ValueError as e:
                raise PrepError(f"{business_path}:{line_no}: {e}; is this a Yelp business "
                                "file?") from None
            meta[b["business_id"]] = (html.unescape(b.get("name") or "").strip(), cats)
    return rows, meta


# -----------------------------------------------------------------------------
# processing

def k_core(rows, k=CORE):
    """Drop users and items with fewer than k interactions, again and again until none is left.

    The result (the largest subset where every user and item has >= k rows, repeats counted) does
    not depend on the row order; kept rows stay in their input order."""
    while True:
        n_user, n_item = {}, {}
        for u, i, _, _ in rows:
            n_user[u] = n_user.get(u, 0) + 1
            n_item[i] = n_item.get(i, 0) + 1
        kept = [r for r in rows if n_user[r[0]] >= k and n_item[r[1]] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


def build(rows, meta, source, dedupe):
    """Sequences and item records from (user, item, time, line_no) rows in file order.

    Each user's items are in time order; `dedupe` keeps only the earliest review of a repeated
    (user, item) pair (Amazon), otherwise repeat visits stay (Yelp). Then the 5-core filter. As in
    the S3-Rec/P5 processing, users are numbered by their first line in the file and items by first
    appearance along the users' sequences. PrepError when nothing survives or metadata is
    missing."""
    user_rank = {}
    for r in rows:
        user_rank.setdefault(r[0], len(user_rank))
    # Time, then line: equal timestamps (Amazon's are whole days, so ties are common) keep file
    # order, which is what the benchmark's stable sort did and what reproduces its files.
    rows = sorted(rows, key=lambda r: (r[2], r[3]))
    if dedupe:
        seen, unique = set(), []
        for r in rows:  # time order, so the earliest review of a pair comes first
            if (r[0], r[1]) not in seen:
                seen.add((r[0], r[1]))
                unique.append(r)
        rows = unique
    rows = k_core(rows)
    if not rows:
        raise PrepError(f"{source}: nothing is left after the {CORE}-core filter; "
                        "is this the right (complete) file?")
    by_user = {}
    for u, i, _, line_no in rows:  # still in time order
        by_user.setdefault(u, []).append((i, line_no))
    item_id, sequences, items = {}, [], []
    for u in sorted(by_user, key=user_rank.__getitem__):
        for i, line_no in by_user[u]:
            if i not in item_id:
                if i not in meta:
                    raise PrepError(f"{source}:{line_no}: item {i} has no metadata; "
                                    "the meta file is incomplete or from another release")
                item_id[i] = len(item_id) + 1
                title, cats = meta[i]
                items.append({"item_id": item_id[i], "asin": i, "title": title, "categories": cats})
        sequences.append([item_id[i] for i, _ in by_user[u]])
    return sequences, items


def write_dataset(out_dir, sequences, items):
    """Both files appear together or not at all (temp files + rename)."""
    os.makedirs(out_dir, exist_ok=True)
    texts = {
        "sequences.txt": "".join(f"{u} " + " ".join(map(str, s)) + "\n"
                                 for u, s in enumerate(sequences, 1)),
        "items.jsonl": "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items),
    }
    temps = {}
    try:
        for name, text in texts.items():
            fd, temps[name] = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(temps[name], 0o644)  # mkstemp makes 0600; data is shared like any file
        for name, tmp in temps.items():
            os.replace(tmp, os.path.join(out_dir, name))
    finally:  # a failure (a full disk, an interrupt) leaves no temporary file behind
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def summary(name, sequences, items):
    """Print the dataset's size and lengths, and a warning when they differ from the benchmark's."""
    lengths = sorted(len(s) for s in sequences)
    n_inter = sum(lengths)
    untitled = sum(1 for it in items if not it["title"])
    print(f"{name}: {len(sequences):,} users, {len(items):,} items, {n_inter:,} interactions; "
          f"length min {lengths[0]} / mean {n_inter / len(lengths):.2f} / median "
          f"{lengths[len(lengths) // 2]} / max {lengths[-1]}; {untitled} untitled items")
    known = KNOWN_SIZES.get(name)
    if known and known != (len(sequences), len(items), n_inter):
        print(f"WARNING: the benchmark's known size is {known[0]:,} users, {known[1]:,} items, "
              f"{known[2]:,} interactions; these files differ, so results are not comparable "
              "with papers")


# -----------------------------------------------------------------------------
# synthetic: planted topics with real-looking text, the offline demo and the test fixture

TOPICS = [  # (category path, title nouns)
    (["Beauty", "Makeup", "Nails", "Nail Polish"],
     ["Nail Lacquer", "Gel Polish", "Top Coat", "Nail Enamel"]),
    (["Beauty", "Makeup", "Eyes", "Mascara"],
     ["Volume Mascara", "Lash Primer", "Waterproof Mascara", "Lash Serum"]),
    (["Beauty", "Makeup", "Lips", "Lipstick"],
     ["Matte Lipstick", "Lip Crayon", "Liquid Lipstick", "Lip Tint"]),
    (["Beauty", "Skin Care", "Face", "Moisturizers"],
     ["Day Cream", "Night Cream", "Hydrating Gel", "Face Lotion"]),
    (["Beauty", "Skin Care", "Face", "Cleansers"],
     ["Foaming Cleanser", "Micellar Water", "Cleansing Oil", "Face Wash"]),
    (["Beauty", "Skin Care", "Sun", "Sunscreen"],
     ["Sunscreen SPF 50", "Sun Stick", "Mineral Sunscreen", "Sun Spray"]),
    (["Beauty", "Hair Care", "Shampoo"],
     ["Clarifying Shampoo", "Dry Shampoo", "Volumizing Shampoo", "Sulfate Free Shampoo"]),
    (["Beauty", "Hair Care", "Styling", "Hair Spray"],
     ["Hair Spray", "Texturizing Spray", "Styling Mousse", "Hair Gel"]),
    (["Beauty", "Tools & Accessories", "Brushes"],
     ["Foundation Brush", "Kabuki Brush", "Blending Sponge", "Brush Set"]),
    (["Beauty", "Fragrance", "Women"],
     ["Eau de Parfum", "Body Mist", "Perfume Oil", "Eau de Toilette"]),
    (["Beauty", "Fragrance", "Men"],
     ["Cologne", "Aftershave", "Eau de Toilette for Men", "Deodorant Stick"]),
    (["Beauty", "Bath & Body", "Soaps"],
     ["Bar Soap", "Shower Gel", "Body Wash", "Bath Bomb"]),
    (["Beauty", "Bath & Body", "Body Lotion"],
     ["Body Butter", "Body Lotion", "Hand Cream", "Foot Cream"]),
    (["Beauty", "Makeup", "Face", "Foundation"],
     ["Liquid Foundation", "BB Cream", "Concealer", "Setting Powder"]),
    (["Beauty", "Makeup", "Eyes", "Eyeshadow"],
     ["Eyeshadow Palette", "Eye Pencil", "Liquid Eyeliner", "Brow Gel"]),
    (["Beauty", "Skin Care", "Treatments", "Serums"],
     ["Vitamin C Serum", "Retinol Serum", "Hyaluronic Serum", "Acne Spot Gel"]),
    (["Beauty", "Hair Care", "Hair Color"],
     ["Hair Dye", "Root Touch Up", "Color Gloss", "Henna Powder"]),
    (["Beauty", "Shaving", "Razors"],
     ["Safety Razor", "Razor Blades", "Shaving Cream", "Beard Oil"]),
    (["Beauty", "Tools & Accessories", "Hair Tools"],
     ["Flat Iron", "Curling Wand", "Hair Dryer", "Hot Brush"]),
    (["Beauty", "Oral Care"],
     ["Whitening Toothpaste", "Electric Toothbrush", "Water Flosser", "Mouthwash"]),
]
BRANDS = ["Lumiere", "Verdant", "Aurora", "Nordic Bloom", "Silk & Stone", "Petal Lab", "Oakmoss",
          "Cirrus", "Marigold", "Bluebay", "Amber Row", "Kinfolk"]
ADJECTIVES = ["Classic", "Pro", "Sensitive", "Organic", "Travel Size", "Deluxe", "Everyday",
              "Ultra"]


def make_synthetic(seed=0, n_users=2000, n_items=1000, min_len=5, max_len=20):
    """Items in 20 topics; each user follows 2-4 topics and drifts between them.

    Returns (sequences, items, user_topics) where user_topics is the planted ground truth. Item ids
    follow first appearance, as for the real data; items no user drew come last, so the catalogue
    always has n_items items (the default 2,000 x 1,000 draws every item). Python's Random with
    precomputed cumulative weights (the same draws as with `weights=`, without re-summing a
    topic's weights per draw): 100,000 users x 367,982 items take about 10 s."""
    n_topics = len(TOPICS)
    if not 1 <= min_len <= max_len or 2 * (n_items // n_topics) < max_len:
        raise PrepError(f"synthetic: need 1 <= min-len <= max-len and at least {n_topics} * "
                        "max-len / 2 items (a user with two topics must find max-len distinct "
                        f"items); got min-len {min_len}, max-len {max_len}, {n_items} items")
    rng = random.Random(seed)
    item_topic = [i % n_topics for i in range(n_items)]
    rng.shuffle(item_topic)
    members = [[] for _ in range(n_topics)]
    for i, t in enumerate(item_topic):
        members[t].append(i)
    # a Zipf-like popularity inside each topic, so popularity is a real (but weak) baseline
    cum_weights = [list(itertools.accumulate(1.0 / (r + 1) ** 0.8 for r in range(len(m))))
                   for m in members]
    items = []
    for i in range(n_items):
        path, nouns = TOPICS[item_topic[i]]
        brand, adjective, noun = rng.choice(BRANDS), rng.choice(ADJECTIVES), rng.choice(nouns)
        title = f"{brand} {adjective} {noun}, {rng.choice([1, 2, 4, 8])} oz"
        items.append({"asin": f"SYN{i:06d}", "title": title, "categories": [list(path)]})
    sequences, user_topics = [], []
    for _ in range(n_users):
        topics = rng.sample(range(n_topics), rng.randint(2, 4))
        length = rng.randint(min_len, max_len)
        topic, seq, seen = rng.choice(topics), [], set()
        while len(seq) < length:
            if rng.random() < 0.3:  # switch interest now and then
                topic = rng.choice(topics)
            i = rng.choices(members[topic], cum_weights=cum_weights[topic])[0]
            if i not in seen:
                seen.add(i)
                seq.append(i)
        sequences.append(seq)
        user_topics.append(sorted(topics))
    # ids by first appearance, as for the real data, then the items nobody drew
    item_id, ordered = {}, []
    for i in itertools.chain((i for seq in sequences for i in seq), range(n_items)):
        if i not in item_id:
            item_id[i] = len(item_id) + 1
            ordered.append(dict(item_id=item_id[i], **items[i]))
    return [[item_id[i] for i in s] for s in sequences], ordered, user_topics


# -----------------------------------------------------------------------------
# command line

def prepare(name, out, raw_dir=None, seed=0, synthetic=None):
    """synthetic: make_synthetic's size arguments (n_users, n_items, min_len, max_len); None: its
    defaults."""
    if name == "synthetic":
        sequences, items, _ = make_synthetic(seed, **(synthetic or {}))
    elif name in AMAZON:
        cat = AMAZON[name]
        files = [f"reviews_{cat}_5.json.gz", f"meta_{cat}.json.gz"]
        if raw_dir:
            paths = [os.path.join(raw_dir, f) for f in files]
            for p in paths:
                if not os.path.exists(p):
                    raise PrepError(f"{p} is missing: download {os.path.basename(p)} of the 2014 "
                                    f"Amazon release (e.g. {MIRRORS[0]}{os.path.basename(p)}) "
                                    f"into {raw_dir}")
        else:
            paths = [download([m + f for m in MIRRORS], os.path.join(out, "raw", f)) for f in files]
        rows = read_amazon_reviews(paths[0])
        meta = read_amazon_meta(paths[1], {r[1] for r in rows})
        sequences, items = build(rows, meta, paths[0], dedupe=True)
    elif name == "yelp":
        missing = [f for f in YELP_FILES
                   if not raw_dir or not os.path.exists(os.path.join(raw_dir, f))]
        if missing:
            raise PrepError(f"{', '.join(missing)} missing: Yelp cannot be downloaded "
                            "automatically (its licence needs a click-through); get the JSON "
                            "version of the Yelp Open Dataset at https://www.yelp.com/dataset, "
                            f"extract {' and '.join(YELP_FILES)} into a folder and run "
                            "`.venv/bin/python data_prep.py yelp --raw-dir FOLDER`")
        rows, meta = read_yelp(raw_dir)
        sequences, items = build(rows, meta, os.path.join(raw_dir, YELP_FILES[0]), dedupe=False)
    else:
        raise PrepError(f"unknown dataset {name!r}: choose beauty, sports, toys, yelp or synthetic")
    write_dataset(os.path.join(out, name), sequences, items)
    summary(name, sequences, items)
    print(f"wrote {os.path.join(out, name)}/sequences.txt and items.jsonl")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--out", default="data", help="output folder (default: data)")
    p.add_argument("--raw-dir", help="folder with raw files fetched by hand (skips the download)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    p.add_argument("--users", type=int, default=2000, help="synthetic: number of users")
    p.add_argument("--items", type=int, default=1000,
                   help="synthetic: catalogue size (367982: Amazon Books)")
    p.add_argument("--min-len", type=int, default=5,
                   help="synthetic: shortest sequence (3 or more for loo)")
    p.add_argument("--max-len", type=int, default=20, help="synthetic: longest sequence")
    args = p.parse_args(argv)
    synthetic = dict(n_users=args.users, n_items=args.items, min_len=args.min_len,
                     max_len=args.max_len)
    try:
        prepare(args.dataset, args.out, args.raw_dir, args.seed, synthetic)
    except PrepError as e:
        sys.exit(f"data_prep: {e}")


if __name__ == "__main__":
    main()
