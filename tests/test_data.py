"""Foundation: raw parsers, 5-core, bad input, synthetic data, loading and both split protocols."""
import gzip
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import bimi
import data_prep
from conftest import SHARED, shared_beauty

# ----------------------------------------------------------------- raw fixtures in the 2014 formats


def write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def review(user, asin, t):
    return json.dumps({"reviewerID": user, "asin": asin, "unixReviewTime": t, "overall": 5.0,
                       "reviewText": "ok"})


def meta(asin, title=None, cats=(("Beauty", "Makeup"),)):
    record = {"asin": asin, "categories": [list(c) for c in cats], "salesRank": {"Beauty": 1}}
    if title is not None:
        record["title"] = title
    return repr(record)  # Python dict literal, single quotes, as in meta_*.json.gz


def amazon_fixture(raw):
    """Five users x items I1..I5 form the core. Y has 4 reviewers (u1, u2, u3, u6): dropping it
    leaves u6 with 4 reviews, dropping u6 leaves X with 4 reviewers (u1..u4), which drops X too."""
    rows = []
    for u in ["u1", "u2", "u3", "u4", "u5"]:
        for n, item in enumerate(["I1", "I2", "I3", "I4", "I5"]):
            rows.append(review(u, item, 1000 + 10 * n))
    # u1: I5 and I4 tie at time 5 -> file order (I5 first) must be kept, and both come first
    rows[3] = review("u1", "I5", 5)
    rows[4] = review("u1", "I4", 5)
    rows += [review(u, "Y", 2000) for u in ["u1", "u2", "u3"]]
    rows += [review(u, "X", 3000) for u in ["u1", "u2", "u3", "u4"]]
    rows += [review("u6", i, 100 + n) for n, i in enumerate(["I1", "I2", "I3", "Y", "X"])]
    write_gz(os.path.join(raw, "reviews_Beauty_5.json.gz"), rows)
    metas = [meta("I1", "Nail &amp; Polish"), meta("I2", "Lipstick"), meta("I3"),  # I3 has no title
             meta("I4", "Mascara", [["Beauty", "Makeup", "Eyes"], ["Beauty", "Gifts"]]),
             meta("I5", "Cream"),
             meta("X", "x"), meta("Y", "y"), meta("UNUSED", "never reviewed")]
    write_gz(os.path.join(raw, "meta_Beauty.json.gz"), metas)


@pytest.mark.parametrize("title, written", [
    ("Gel polish \ud83d\udc85 pink", "Gel polish \U0001f485 pink"),  # a pair from a narrow build
    ("Gel polish \U0001f485 pink", "Gel polish \U0001f485 pink"),
    ("Gel polish \ud83d", "Gel polish \ufffd"),  # half a pair, cut at 100 characters
])
def test_surrogate_escapes_in_meta_become_valid_utf8(tmp_path, title, written):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    os.makedirs(raw)
    amazon_fixture(raw)
    with gzip.open(os.path.join(raw, "meta_Beauty.json.gz"), "at", encoding="utf-8",
                   errors="surrogatepass") as f:
        f.write(meta("I2", title) + "\n")  # a later line for I2 wins
    data_prep.prepare("beauty", out, raw)
    assert bimi.load_dataset(out, "beauty").titles[4] == written
    assert sorted(os.listdir(os.path.join(out, "beauty"))) == ["items.jsonl", "sequences.txt"]


@pytest.mark.parametrize("record", [  # the 2018 and 2023 releases, given under the 2014 names
    {"asin": "I1", "title": "<span>Nail Polish</span>", "category": ["Beauty", "Nails"],
     "main_cat": "All Beauty", "rank": None, "also_buy": []},
    {"parent_asin": "I1", "asin": "I1", "title": "Nail Polish", "main_category": "All Beauty",
     "categories": ["Beauty", "Nails"], "details": {}},
])
def test_a_later_release_of_the_amazon_meta_is_named_not_called_damaged(tmp_path, record):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    os.makedirs(raw)
    amazon_fixture(raw)
    write_gz(os.path.join(raw, "meta_Beauty.json.gz"), [json.dumps(record)])
    with pytest.raises(data_prep.PrepError, match="meta_Beauty.json.gz:1: a record of a later "
                                                  "release") as e:
        data_prep.prepare("beauty", out, raw)
    assert "damaged" not in str(e.value) and not os.path.exists(os.path.join(out, "beauty"))


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(data_prep.os, "replace", full_disk)
    with pytest.raises(OSError):
        data_prep.write_dataset(str(tmp_path), [[1, 2, 3]], [{"item_id": 1}])
    assert os.listdir(tmp_path) == []


def read_out(out):
    with open(os.path.join(out, "beauty", "sequences.txt")) as f:
        seqs = [list(map(int, line.split())) for line in f]
    with open(os.path.join(out, "beauty", "items.jsonl")) as f:
        items = [json.loads(line) for line in f]
    return seqs, items


def test_amazon_parsers_core_ties_and_ids(tmp_path):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    os.makedirs(raw)
    amazon_fixture(raw)
    data_prep.prepare("beauty", out, raw)
    seqs, items = read_out(out)
    # cascade: Y, u6 and X are all gone; 5 users x 5 items remain
    assert [s[0] for s in seqs] == [1, 2, 3, 4, 5]
    asins = [it["asin"] for it in items]
    assert sorted(asins) == ["I1", "I2", "I3", "I4", "I5"]
    # u1: I5 and I4 at time 5 (file order: I5 then I4), then I1, I2, I3 -> ids by first appearance
    assert asins[:5] == ["I5", "I4", "I1", "I2", "I3"]
    assert seqs[0][1:] == [1, 2, 3, 4, 5]
    assert seqs[1][1:] == [3, 4, 5, 2, 1]  # u2 in time order I1..I5
    by_asin = {it["asin"]: it for it in items}
    assert by_asin["I1"]["title"] == "Nail & Polish"  # HTML entity decoded
    assert by_asin["I3"]["title"] == ""  # missing title written as ""
    assert by_asin["I4"]["categories"] == [["Beauty", "Makeup", "Eyes"], ["Beauty", "Gifts"]]
    assert [it["item_id"] for it in items] == [1, 2, 3, 4, 5]
    # and the kit loads what data_prep wrote
    data = bimi.load_dataset(out, "beauty")
    assert data.n_items == 5 and len(data.sequences) == 5


def test_k_core_cascade_directly():
    rows = [("a", "i", 0, 1), ("a", "j", 0, 2), ("b", "i", 0, 3)]
    assert data_prep.k_core(rows, k=2) == []  # j has 1 -> a has 1 -> i has 1 -> nothing
    rows = [("a", "i", 0, 1), ("a", "j", 0, 2), ("b", "i", 0, 3), ("b", "j", 0, 4),
            ("c", "i", 0, 5)]
    assert sorted(r[0] for r in data_prep.k_core(rows, k=2)) == ["a", "a", "b", "b"]


@pytest.mark.parametrize("case, needle", [
    ("truncated", "truncated or corrupt gzip"),
    ("malformed", "reviews_Beauty_5.json.gz:3: malformed record"),
    ("malformed_meta", "meta_Beauty.json.gz:2: malformed record"),
    ("no_meta", "item I5 has no metadata"),
    ("empty", "nothing is left after the 5-core filter"),
])
def test_bad_input_gives_clear_error_and_no_output(tmp_path, case, needle):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    os.makedirs(raw)
    amazon_fixture(raw)
    reviews = os.path.join(raw, "reviews_Beauty_5.json.gz")
    metas = os.path.join(raw, "meta_Beauty.json.gz")
    if case == "truncated":
        blob = open(reviews, "rb").read()
        open(reviews, "wb").write(blob[: len(blob) // 2])
    elif case == "malformed":
        with gzip.open(reviews, "rt") as f:
            lines = f.read().splitlines()
        lines[2] = lines[2][:-5]
        write_gz(reviews, lines)
    elif case == "malformed_meta":
        with gzip.open(metas, "rt") as f:
            lines = f.read().splitlines()
        # never evaluated
        lines[1] = "{'asin': 'I2', 'title': __import__('os').system('echo pwned')}"
        write_gz(metas, lines)
    elif case == "no_meta":
        with gzip.open(metas, "rt") as f:
            write_gz(metas, [line for line in f.read().splitlines() if "'I5'" not in line])
    elif case == "empty":
        write_gz(reviews, [review("u1", "I1", 1), review("u2", "I1", 2)])
    with pytest.raises(data_prep.PrepError, match=needle.replace(".", r"\.")):
        data_prep.prepare("beauty", out, raw)
    assert not os.path.exists(os.path.join(out, "beauty", "sequences.txt"))
    assert not os.path.exists(os.path.join(out, "beauty", "items.jsonl"))


def test_yelp_without_files_explains_what_to_fetch(tmp_path):
    with pytest.raises(data_prep.PrepError, match="yelp_academic_dataset_review.json"):
        data_prep.prepare("yelp", str(tmp_path), str(tmp_path))


def test_yelp_parser_filters_dates_and_uses_business_names(tmp_path):
    reviews, businesses = [], []
    for u in range(5):
        for b in range(5):
            reviews.append(json.dumps({"user_id": f"u{u}", "business_id": f"b{b}",
                                       "date": f"2019-0{b + 1}-01 10:00:00"}))
        reviews.append(json.dumps({"user_id": f"u{u}", "business_id": "old",
                                   "date": "2018-12-31 23:59:59"}))
    for b in range(5):
        businesses.append(json.dumps({"business_id": f"b{b}", "name": f"Cafe {b} &amp; Bar",
                                      "categories": "Food, Coffee & Tea"}))
    for name, lines in zip(data_prep.YELP_FILES, (reviews, businesses)):
        with open(tmp_path / name, "w") as f:
            f.write("\n".join(lines) + "\n")
    data_prep.prepare("yelp", str(tmp_path / "out"), str(tmp_path))
    data = bimi.load_dataset(str(tmp_path / "out"), "yelp")
    assert data.n_items == 5  # the 2018 review is filtered out
    assert data.titles[1] == "Cafe 0 & Bar" and data.categories[1] == [["Food"], ["Coffee & Tea"]]


def write_yelp(folder, reviews, businesses):
    """Plain JSON-lines Yelp files; reviews are (user, business, date) in file order."""
    rows = [json.dumps({"review_id": f"r{n}", "user_id": u, "business_id": b,
                        "stars": 1 + n % 5, "date": d})
            for n, (u, b, d) in enumerate(reviews)]
    for name, lines in zip(data_prep.YELP_FILES, (rows, [json.dumps(b) for b in businesses])):
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(lines) + "\n")


def read_processed(folder):
    with open(os.path.join(folder, "sequences.txt")) as f:
        seqs = [line.split()[1:] for line in f]
    with open(os.path.join(folder, "items.jsonl")) as f:
        items = [json.loads(line) for line in f]
    return seqs, items


@pytest.mark.parametrize("shape, categories, expected", [
    ("string (2019+ dumps)", "Food, Coffee & Tea", [["Food"], ["Coffee & Tea"]]),
    ("JSON list (older dumps)", ["Food", "Coffee & Tea"], [["Food"], ["Coffee & Tea"]]),
    ("null", None, []),
    ("empty string", "", []),
])
def test_yelp_categories_in_every_dump_shape(tmp_path, shape, categories, expected):
    reviews = [(f"u{u}", f"b{b}", f"2019-0{b + 1}-0{u + 1} 10:00:00")
               for u in range(5) for b in range(5)]
    businesses = [{"business_id": f"b{b}", "name": f"Cafe {b}",
                   "categories": categories if b == 0 else "Bars"}
                  for b in range(5)]
    write_yelp(tmp_path, reviews, businesses)
    data_prep.prepare("yelp", str(tmp_path / "out"), str(tmp_path))
    data = bimi.load_dataset(str(tmp_path / "out"), "yelp")
    assert data.categories[1] == expected and data.categories[2] == [["Bars"]]


def test_yelp_categories_of_another_type_name_the_line(tmp_path):
    reviews = [(f"u{u}", f"b{b}", f"2019-0{b + 1}-0{u + 1} 10:00:00")
               for u in range(5) for b in range(5)]
    businesses = [{"business_id": f"b{b}", "name": "x",
                   "categories": {"Food": True} if b == 3 else "Bars"}
                  for b in range(5)]
    write_yelp(tmp_path, reviews, businesses)
    with pytest.raises(data_prep.PrepError) as e:
        data_prep.prepare("yelp", str(tmp_path / "out"), str(tmp_path))
    assert str(e.value) == (f"{tmp_path}/yelp_academic_dataset_business.json:4: categories is "
                            "dict, expected a string, a list or null; is this a Yelp business "
                            "file?")


def test_yelp_follows_the_benchmark_year_order_and_repeats(tmp_path):
    """S3-Rec/P5: dates within ['2019-01-01 00:00:00', '2019-12-31 00:00:00'], every rating, repeat
    visits kept, per-user time order, users numbered by their first line, items by first
    appearance."""
    reviews = [("u2", "rare", "2019-06-01 10:00:00")]  # u2's first line; the 5-core removes it
    reviews += [(f"u{u}", f"b{b}", f"2019-0{b + 1}-0{u + 1} 10:00:00")
                for b in (4, 3, 2, 1, 0) for u in range(5)]
    # upper bound, inclusive: a repeat visit, kept
    reviews += [("u0", "b0", "2019-12-31 00:00:00"),
                ("u1", "b1", "2019-12-31 00:00:01"),   # after the upper bound
                ("u2", "b2", "2018-12-31 23:59:59"),   # before the lower bound
                ("u3", "b3", "2019-01-01 00:00:00")]   # lower bound, inclusive: u3's earliest visit
    write_yelp(tmp_path, reviews, [{"business_id": b, "name": b, "categories": "Food"}
                                   for b in ["rare", "b0", "b1", "b2", "b3", "b4"]])
    data_prep.prepare("yelp", str(tmp_path / "out"), str(tmp_path))
    seqs, items = read_processed(tmp_path / "out" / "yelp")
    assert [it["asin"] for it in items] == ["b0", "b1", "b2", "b3", "b4"]
    assert seqs == [["1", "2", "3", "4", "5"],          # u2
                    ["1", "2", "3", "4", "5", "1"],     # u0 with its repeat visit
                    ["1", "2", "3", "4", "5"],          # u1
                    ["4", "1", "2", "3", "4", "5"],     # u3
                    ["1", "2", "3", "4", "5"]]          # u4


def test_yelp_dump_without_2019_says_so_with_the_latest_date(tmp_path):
    reviews = [(f"u{u}", f"b{b}", f"2017-0{b + 1}-0{u + 1} 10:00:00")
               for u in range(5) for b in range(5)]
    write_yelp(tmp_path, reviews,
               [{"business_id": f"b{b}", "name": "x", "categories": ["Food"]} for b in range(5)])
    with pytest.raises(data_prep.PrepError) as e:
        data_prep.prepare("yelp", str(tmp_path / "out"), str(tmp_path))
    assert str(e.value) == (f"{tmp_path}/yelp_academic_dataset_review.json: no review dated "
                            "2019-01-01 00:00:00 to 2019-12-31 00:00:00, the benchmark's year "
                            "(the latest review here is 2017-05-05 10:00:00); use a Yelp Open "
                            "Dataset release that covers 2019 (https://www.yelp.com/dataset)")


def test_amazon_repeated_pair_keeps_earliest_and_file_order_does_not_matter(tmp_path):
    rows = [review(f"u{u}", f"I{i}", 1000 * u + 10 * i) for u in range(1, 6) for i in range(1, 6)]
    # u1's repeat of I3, earlier in time but later in the file
    rows.insert(0, review("u1", "I3", 900))
    rows[0], rows[3] = rows[3], rows[0]
    metas = [meta(f"I{i}", f"t{i}") for i in range(1, 6)]
    asin_seqs = []
    for name, lines in [("file", rows), ("reversed", rows[::-1])]:
        raw, out = tmp_path / name / "raw", tmp_path / name / "out"
        os.makedirs(raw)
        write_gz(raw / "reviews_Beauty_5.json.gz", lines)
        write_gz(raw / "meta_Beauty.json.gz", metas)
        data_prep.prepare("beauty", str(out), str(raw))
        seqs, items = read_processed(out / "beauty")
        asin = {str(it["item_id"]): it["asin"] for it in items}
        asin_seqs.append(sorted([asin[i] for i in s] for s in seqs))
    assert asin_seqs[0] == asin_seqs[1]
    assert ["I3", "I1", "I2", "I4", "I5"] in asin_seqs[0]  # u1: I3 at its earliest time (900), once
    assert sum(len(s) for s in asin_seqs[0]) == 25


@pytest.mark.parametrize("plain", ["reviews", "meta", "both"])
def test_json_gz_already_decompressed_is_read_as_text(tmp_path, plain):
    """Decided by the gzip magic bytes, never by the name (browsers unpack .gz and keep the
    name)."""
    raw = tmp_path / "raw"
    os.makedirs(raw)
    amazon_fixture(str(raw))
    data_prep.prepare("beauty", str(tmp_path / "gz"), str(raw))
    for name in {"reviews": ["reviews_Beauty_5.json.gz"], "meta": ["meta_Beauty.json.gz"],
                 "both": ["reviews_Beauty_5.json.gz", "meta_Beauty.json.gz"]}[plain]:
        with gzip.open(raw / name, "rb") as f:
            text = f.read()
        (raw / name).write_bytes(text)
    data_prep.prepare("beauty", str(tmp_path / "plain"), str(raw))
    assert read_out(str(tmp_path / "plain")) == read_out(str(tmp_path / "gz"))


def test_gzip_under_a_plain_name_is_read_too(tmp_path):
    reviews = [(f"u{u}", f"b{b}", f"2019-0{b + 1}-0{u + 1} 10:00:00")
               for u in range(5) for b in range(5)]
    write_yelp(tmp_path, reviews,
               [{"business_id": f"b{b}", "name": "x", "categories": "Food"} for b in range(5)])
    path = tmp_path / data_prep.YELP_FILES[0]
    text = path.read_bytes()
    with gzip.open(path, "wb") as f:
        f.write(text)
    data_prep.prepare("yelp", str(tmp_path / "out"), str(tmp_path))
    assert len(read_processed(tmp_path / "out" / "yelp")[0]) == 5


class Mirror(BaseHTTPRequestHandler):
    """/moved answers 200 with an HTML page (a retired dataset link), /file.gz with gzip data."""
    page = b"<!DOCTYPE html><html><body>This dataset has moved.</body></html>"
    blob = gzip.compress(b'{"asin": "I1"}\n')

    def log_message(self, *args):
        pass

    def do_GET(self):
        kind, body = (("application/gzip", self.blob) if self.path == "/file.gz"
                      else ("text/html", self.page))
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def mirror():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_refuses_an_html_page_and_keeps_nothing(tmp_path, mirror):
    dest = tmp_path / "raw" / "reviews_Beauty_5.json.gz"
    with pytest.raises(data_prep.PrepError) as e:
        data_prep.download([f"{mirror}/moved"], str(dest))
    assert str(e.value) == (f"could not download reviews_Beauty_5.json.gz ({mirror}/moved: "
                            "answered with text/html starting b'<!DOCTYPE html><', not gzip data "
                            "(the link has moved or a web page answered)); fetch it by hand into "
                            "a folder FOLDER, run `.venv/bin/python data_prep.py DATASET "
                            "--raw-dir FOLDER` (with --out DIR for another data folder) and then "
                            "the reproduction again")
    assert os.listdir(tmp_path / "raw") == []  # neither the final name nor a .part
    # the next mirror that serves gzip data wins
    assert data_prep.download([f"{mirror}/moved", f"{mirror}/file.gz"], str(dest)) == str(dest)
    assert dest.read_bytes() == Mirror.blob and os.listdir(tmp_path / "raw") == [dest.name]


def test_download_reuses_complete_file_and_never_leaves_part(tmp_path):
    dest = tmp_path / "f.gz"
    dest.write_bytes(b"done")
    # reused, no request
    assert data_prep.download(["http://127.0.0.1:9/never"], str(dest)) == str(dest)
    with pytest.raises(data_prep.PrepError, match="could not download"):
        data_prep.download(["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"], str(tmp_path / "g.gz"))
    assert sorted(os.listdir(tmp_path)) == ["f.gz"]


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_has_planted_topics():
    a = data_prep.make_synthetic(seed=0)
    assert a == data_prep.make_synthetic(seed=0)
    assert a[0] != data_prep.make_synthetic(seed=1)[0]
    sequences, items, user_topics = a
    assert len(sequences) == 2000 and 900 <= len(items) <= 1000
    path_to_topic = {tuple(path): t for t, (path, _) in enumerate(data_prep.TOPICS)}
    item_topic = {it["item_id"]: path_to_topic[tuple(it["categories"][0])] for it in items}
    for seq, topics in zip(sequences, user_topics):
        assert 2 <= len(topics) <= 4 and len(seq) >= 5 and len(set(seq)) == len(seq)
        assert {item_topic[i] for i in seq} <= set(topics)  # every item comes from a planted topic
    # users stay on an interest for a while: consecutive items share a topic far above chance (1/20)
    pairs = [(item_topic[a], item_topic[b]) for seq in sequences for a, b in zip(seq, seq[1:])]
    assert sum(a == b for a, b in pairs) / len(pairs) > 0.6
    # titles carry the topic's words, categories its path
    for it in items[:50]:
        nouns = data_prep.TOPICS[item_topic[it["item_id"]]][1]
        assert any(n in it["title"] for n in nouns)


def test_synthetic_loads_and_splits_offline(synthetic_dir):
    # readable by others, as a plain open() would leave it
    for name in ("sequences.txt", "items.jsonl"):
        assert os.stat(os.path.join(synthetic_dir, "synthetic", name)).st_mode & 0o777 == 0o644
    data = bimi.load_dataset(synthetic_dir, "synthetic")
    for protocol in ("loo", "user"):
        split = bimi.make_split(data, protocol)
        assert len(split.train_target) > 10000


# --------------------------------------------------------------------------- loading and validation


def write_processed(folder, seq_lines, n_items=3):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sequences.txt"), "w") as f:
        f.write("\n".join(seq_lines) + "\n")
    with open(os.path.join(folder, "items.jsonl"), "w") as f:
        for i in range(1, n_items + 1):
            f.write(json.dumps({"item_id": i, "asin": f"A{i}", "title": f"t{i}",
                                "categories": [["c"]]}) + "\n")


@pytest.mark.parametrize("lines, needle", [
    (["1 1 2 3", "3 1 2"], "sequences.txt:2: user id 3, expected 2"),
    (["1 1 2 3", "2 1 9"], "sequences.txt:2: item 9 is not in"),
    (["1 1 2 3", "2"], "sequences.txt:2: user without items"),
    (["1 1 x"], "sequences.txt:1: non-integer token 'x'"),
])
def test_load_rejects_bad_files_with_file_and_line(tmp_path, lines, needle):
    write_processed(str(tmp_path / "d"), lines)
    with pytest.raises(bimi.DataError, match=needle):
        bimi.load_dataset(str(tmp_path), "d")


@pytest.mark.parametrize("fields, needle", [
    ({"title": None}, "items.jsonl:2: title is null, expected a string"),
    ({"categories": None}, "items.jsonl:2: categories is null, expected a list of category paths"),
    ({"categories": "Beauty"}, 'categories is "Beauty", expected a list of category paths'),
    ({"categories": ["Beauty", "Nails"]}, "categories is [\"Beauty\", \"Nails\"], expected"),
    ({"categories": [["Beauty", 7]]}, "each a list of strings"),
    ({"categories": [[]]}, "categories is [[]], expected"),
])
def test_load_checks_every_fields_type_with_file_and_line(tmp_path, fields, needle):
    write_processed(str(tmp_path / "d"), ["1 1 2 3"])
    lines = open(tmp_path / "d" / "items.jsonl").read().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), **fields})
    (tmp_path / "d" / "items.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(bimi.DataError, match=re.escape(needle)):
        bimi.load_dataset(str(tmp_path), "d")


def test_load_rejects_gappy_item_ids(tmp_path):
    write_processed(str(tmp_path / "d"), ["1 1 2 3"])
    with open(tmp_path / "d" / "items.jsonl", "a") as f:
        f.write(json.dumps({"item_id": 7, "asin": "x", "title": "", "categories": []}) + "\n")
    with pytest.raises(bimi.DataError, match="items.jsonl:4: item_id 7, expected 4"):
        bimi.load_dataset(str(tmp_path), "d")


def test_missing_dataset_says_how_to_make_it(tmp_path):
    with pytest.raises(bimi.DataError, match="python data_prep.py beauty"):
        bimi.load_dataset(str(tmp_path), "beauty")


def test_missing_items_file_is_one_line_naming_it(tmp_path):
    write_processed(str(tmp_path / "d"), ["1 1 2 3"])
    os.remove(tmp_path / "d" / "items.jsonl")
    with pytest.raises(bimi.DataError) as e:
        bimi.load_dataset(str(tmp_path), "d")
    assert str(e.value) == (f"{tmp_path}/d/items.jsonl not found: write sequences.txt and "
                            "items.jsonl there (README: Your own dataset) (or point --data_dir at "
                            "a folder that holds the processed datasets)")
    # a dataset data_prep.py makes: the command that makes it
    with pytest.raises(bimi.DataError) as e:
        bimi.load_dataset(str(tmp_path), "beauty")
    assert "run `.venv/bin/python data_prep.py beauty`, which writes sequences.txt and " \
        "items.jsonl" in str(e.value)


@pytest.mark.parametrize("edit", ["trailing blank lines", "byte-order marks", "CRLF", "all three"])
def test_load_files_as_editors_save_them(tmp_path, edit):
    write_processed(str(tmp_path / "d"), ["1 1 2 3", "2 3 1"])
    for name in ("sequences.txt", "items.jsonl"):
        path = tmp_path / "d" / name
        text = path.read_text()
        if edit in ("trailing blank lines", "all three"):
            text += "\n  \n\n"
        if edit in ("CRLF", "all three"):
            text = text.replace("\n", "\r\n")
        if edit in ("byte-order marks", "all three"):
            text = "\ufeff" + text
        path.write_bytes(text.encode("utf-8"))
    data = bimi.load_dataset(str(tmp_path), "d")
    assert [s.tolist() for s in data.sequences] == [[1, 2, 3], [3, 1]]
    assert data.titles == ["", "t1", "t2", "t3"] and data.categories[1] == [["c"]]


@pytest.mark.parametrize("name, needle", [
    ("sequences.txt", "sequences.txt:2: blank line; remove it (one user per line)"),
    ("items.jsonl", "items.jsonl:2: blank line; remove it (one item per line)"),
])
def test_blank_line_in_the_middle_is_named(tmp_path, name, needle):
    write_processed(str(tmp_path / "d"), ["1 1 2 3", "2 3 1"])
    path = tmp_path / "d" / name
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n")
    with pytest.raises(bimi.DataError) as e:
        bimi.load_dataset(str(tmp_path), "d")
    assert str(e.value) == f"{tmp_path}/d/{needle}"


# ----------------------------------------------------------------------------- repeat consumption


def test_repeats_are_counted_and_warned_in_one_line(tmp_path, capsys):
    # users 1, 3 and 5 end on an item they already had; user 3's validation item is a repeat too
    write_processed(str(tmp_path / "repeats"), ["1 1 2 3 4 1", "2 2 3 4 5 6", "3 3 4 5 3 4",
                                                "4 4 5 6 1 2", "5 5 6 1 2 5"], n_items=6)
    data = bimi.load_dataset(str(tmp_path), "repeats")
    assert data.repeating == 3
    counts = bimi.repeat_summary(data, bimi.make_split(data, "loo"))
    logged = capsys.readouterr().out.splitlines()
    assert counts == {"repeating_sequences": 3, "valid_in_history": 1, "valid_targets": 5,
                      "test_in_history": 3, "test_targets": 5}
    assert logged == ["WARNING: repeats: 3 of 5 sequences repeat an item; 1 of 5 validation "
                      "targets (20.0 %) and 3 of 5 test targets (60.0 %) are already in the "
                      "user's history, which is masked from the ranking, so no model can hit them"]


def test_no_repeats_no_warning(synthetic_dir, capsys):
    data = bimi.load_dataset(synthetic_dir, "synthetic")
    counts = bimi.repeat_summary(data, bimi.make_split(data, "user"))
    logged = capsys.readouterr().out.splitlines()
    assert data.repeating == 0 and logged == []
    assert counts["valid_in_history"] == counts["test_in_history"] == 0


def test_user_protocol_counts_a_repeated_held_out_item_once(tmp_path):
    from test_ibim import reference_metrics
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, 41):  # ten items, the last two the same: Yelp's repeat visits
        items = rng.choice(np.arange(1, 13), 9, replace=False).tolist()
        lines.append(" ".join(map(str, [u] + items + items[-1:])))
    write_processed(str(tmp_path / "rep"), lines, n_items=12)
    data = bimi.load_dataset(str(tmp_path), "rep")
    split = bimi.make_split(data, "user")
    ours = bimi.popularity_metrics(split, data.n_items, cutoffs=(5,))
    counts = np.bincount(np.concatenate(list(split.train_seqs.values())),
                         minlength=13).astype(float)
    raw = [data.sequences[u - 1] for u in split.test.users]  # the oracle reads the raw sequences
    targets = [sorted(set(s[max(1, int(0.8 * len(s))):].tolist())) for s in raw]
    seen = [s[:max(1, int(0.8 * len(s)))].tolist() for s in raw]
    reference = reference_metrics(np.broadcast_to(counts, (len(raw), 13)), seen, targets, 5)
    for k, v in reference.items():
        assert ours[k] == pytest.approx(v.mean(), abs=1e-6), k
    assert ours["ndcg@5"] <= 1


# ------------------------------------------------------------------ splits against a slow reference


def reference_loo(sequences, max_len):
    hist, target, user = [], [], []
    for u, seq in enumerate(sequences, 1):
        train = list(seq[:-2])
        for t in range(1, len(train)):
            h = train[max(0, t - max_len):t]
            hist.append(h + [0] * (max_len - len(h)))
            target.append(train[t])
            user.append(u)
    return np.array(hist), np.array(target), np.array(user)


def test_loo_split_matches_loop_reference(synthetic_dir):
    data = bimi.load_dataset(synthetic_dir, "synthetic")
    split = bimi.make_split(data, "loo", max_len=7)
    hist, target, user = reference_loo(data.sequences, 7)
    np.testing.assert_array_equal(split.train_hist, hist)
    np.testing.assert_array_equal(split.train_target, target)
    np.testing.assert_array_equal(split.train_user, user)
    for row, seq in enumerate(data.sequences[:200]):
        assert split.test.targets[row, 0] == seq[-1] and split.valid.targets[row, 0] == seq[-2]
        assert sorted(split.test.seen[row][split.test.seen[row] > 0]) == sorted(seq[:-1])
        assert list(split.valid.hist[row][split.valid.hist[row] > 0]) == list(seq[:-2][-7:])
        assert list(split.train_seqs[row + 1]) == list(seq[:-2])


def test_user_split_matches_comirec_recipe(synthetic_dir):
    import random
    data = bimi.load_dataset(synthetic_dir, "synthetic")
    split = bimi.make_split(data, "user", max_len=20)
    users = list(range(1, len(data.sequences) + 1))
    random.seed(1230)  # ComiRec's preprocessing: random.seed(1230); random.shuffle(user ids)
    random.shuffle(users)
    n = len(users)
    assert sorted(split.train_seqs) == sorted(users[:int(0.8 * n)])
    assert list(split.valid.users) == users[int(0.8 * n):int(0.9 * n)]
    assert list(split.test.users) == users[int(0.9 * n):]
    for row, u in enumerate(split.test.users[:100]):
        seq = list(data.sequences[u - 1])
        cut = max(1, int(0.8 * len(seq)))
        assert list(split.test.targets[row][split.test.targets[row] > 0]) == seq[cut:]
        assert list(split.test.hist[row][split.test.hist[row] > 0]) == seq[:cut][-20:]


# ----------------------------------------------------------------------------- the real benchmark


def test_real_yelp_repeats_match_a_loop_reference():
    if not os.path.exists(os.path.join(SHARED, "yelp", "sequences.txt")):
        pytest.skip("../shared/data/yelp is absent (a user's clone has no ../shared)")
    data = bimi.load_dataset(SHARED, "yelp")
    assert data.repeating == 7102 == sum(len(set(s.tolist())) < len(s) for s in data.sequences)
    loo = bimi.repeat_summary(data, bimi.make_split(data, "loo"))
    # 6.7 % and 5.4 % of 30,431
    assert (loo["test_in_history"], loo["valid_in_history"]) == (2027, 1640)
    split = bimi.make_split(data, "user")
    counts = bimi.repeat_summary(data, split)
    for part in ("valid", "test"):
        evalset = getattr(split, part)
        hits = sum(t in set(seen.tolist()) for seen, targets in zip(evalset.seen, evalset.targets)
                   for t in targets.tolist() if t)
        assert counts[f"{part}_in_history"] == hits


def test_real_beauty_counts_and_splits():
    data = bimi.load_dataset(shared_beauty(), "beauty")
    assert len(data.sequences) == 22363 and data.n_items == 12101
    assert sum(len(s) for s in data.sequences) == 198502
    loo = bimi.make_split(data, "loo")
    assert len(loo.valid.users) == len(loo.test.users) == 22363
    assert len(loo.train_target) == 131413 == 198502 - 3 * 22363
    user = bimi.make_split(data, "user")
    train = set(user.train_seqs)
    valid, test = set(user.valid.users.tolist()), set(user.test.users.tolist())
    assert (len(train), len(valid), len(test)) == (17890, 2236, 2237)
    assert not (train & valid) and not (train & test) and not (valid & test)
    assert train | valid | test == set(range(1, 22364))
    again = bimi.make_split(data, "user")
    assert list(again.test.users) == list(user.test.users)
    other = bimi.make_split(data, "user", split_seed=7)
    assert list(other.test.users) != list(user.test.users)
