"""The LLM client and ESIM against real HTTP servers on 127.0.0.1 that misbehave the way public
servers do (public failure reports: vLLM, Ollama, llama.cpp, LM Studio, hosted gateways).
One section per kind of problem; each test asserts the exact outcome and the number of requests."""
import email.utils
import json
import math
import os
import time

import numpy as np
import pytest
import torch

import bimi
from fake_llm import ScriptedServer, chat_reply, embeddings_reply


def good_answer(names=("Nail polish", "Skin care", "Fragrance", "Hair styling")):
    interests = [{"name": n, "description": f"Buys {n.lower()}."} for n in names]
    return json.dumps({"interests": interests})


@pytest.fixture
def serve():
    servers = []

    def start(reply):
        servers.append(ScriptedServer(reply))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


@pytest.fixture
def waits(monkeypatch):
    """time.sleep inside the client is recorded, not slept."""
    slept = []
    monkeypatch.setattr(bimi.time, "sleep", slept.append)
    return slept


def make_client(url, tmp_path, logs=None, **kw):
    cfg = bimi.EsimConfig(base_url=url, cache_dir=str(tmp_path / "cache"), **kw)
    return bimi.LLMClient(cfg, log=(logs.append if logs is not None else lambda m: None))


HI = [{"role": "user", "content": "hi"}]


def cache_files(tmp_path):
    return [f for _, _, files in os.walk(tmp_path / "cache") for f in files]


# ----------------------------------------------------------------------- 1. the server's own words


def test_quota_429_is_not_retried_and_says_why(serve, tmp_path, waits):
    body = {"error": {"message": "You exceeded your current quota, check your plan and billing "
                                 "details.", "type": "insufficient_quota",
                      "code": "insufficient_quota"}}
    s = serve(lambda kind, b, n: (429, body, None))
    with pytest.raises(bimi.LLMError) as e:
        make_client(s.url, tmp_path, chat_model="my-model").chat(HI)
    assert len(s.log) == 1 and waits == [] and not e.value.per_user
    assert s.url + "/chat/completions" in str(e.value) and "my-model" in str(e.value)
    assert "exceeded your current quota" in str(e.value)


@pytest.mark.parametrize("error, requests, per_user", [
    # retried, then fine
    ({"message": "Rate limit exceeded (free-model daily limit)", "code": 429}, 2, None),
    ({"message": "Provider returned error: bad request", "code": 400}, 1, True),       # this prompt
    ({"message": "Invalid credentials", "code": 401}, 1, False),                          # fatal
])
def test_error_object_inside_200_is_judged_by_its_code(serve, tmp_path, waits, error, requests,
                                                       per_user):
    s = serve(lambda kind, b, n: (200, {"error": error}, None) if n == 1
              else (200, chat_reply(good_answer()), None))
    client = make_client(s.url, tmp_path)
    if per_user is None:
        assert client.chat(HI) == good_answer()
    else:
        with pytest.raises(bimi.LLMError, match=error["message"].split(" (")[0]) as e:
            client.chat(HI)
        assert e.value.per_user is per_user
    assert len(s.log) == requests


def test_404_without_v1_suggests_it(serve, tmp_path, waits):
    s = serve(lambda kind, b, n: (404, "404 page not found", {"Content-Type": "text/plain"}))
    with pytest.raises(bimi.LLMError) as e:
        make_client(s.root, tmp_path, chat_model="llama3.2").chat(HI)
    text = str(e.value)
    assert "404 page not found" in text and "llama3.2" in text
    assert f"should end in /v1 (e.g. {s.root}/v1)" in text
    assert len(s.log) == 1


@pytest.mark.parametrize("status, payload", [
    (413, "<html><head><title>413 Request Entity Too Large</title></head><body>nginx</body>"
          "</html>"),
    (400, {"error": {"message": "input batch is limited to 10 items", "code": "InvalidParameter"}}),
])
def test_embedding_batch_limits_suggest_embed_batch(serve, tmp_path, waits, status, payload):
    s = serve(lambda kind, b, n: (status, payload, None) if len(b["input"]) > 10
              else (200, embeddings_reply(b["input"]), None))
    texts = [f"interest {k}" for k in range(30)]
    with pytest.raises(bimi.LLMError) as e:
        make_client(s.url, tmp_path).embed(texts)
    assert "--embed_batch" in str(e.value)
    assert "413 Request Entity" in str(e.value) or "limited to 10" in str(e.value)
    assert make_client(s.url, tmp_path, embed_batch=10).embed(texts).shape == (30, 16)


def test_deterministic_500_stops_after_the_same_answer_twice(serve, tmp_path, waits):
    msg = "input of 992 tokens does not fit; raise the physical batch size (now 512)"
    error = {"error": {"code": 500, "message": msg, "type": "server_error"}}
    s = serve(lambda kind, b, n: (500, error, None))
    with pytest.raises(bimi.LLMError) as e:
        make_client(s.url, tmp_path).embed(["x " * 900])
    assert msg in str(e.value) and "--embed_batch" in str(e.value) and len(s.log) == 2


@pytest.mark.parametrize("content_type, payload", [
    ("text/event-stream", 'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: [DONE]\n\n'),
    ("text/html", "<!DOCTYPE html><html>Welcome to nginx</html>"),
])
def test_a_body_that_is_not_json_fails_at_once(serve, tmp_path, waits, content_type, payload):
    s = serve(lambda kind, b, n: (200, payload, {"Content-Type": content_type}))
    with pytest.raises(bimi.LLMError, match="not a JSON object") as e:
        make_client(s.url, tmp_path).chat(HI)
    assert len(s.log) == 1 and s.log[0][1]["stream"] is False
    assert ("stream" in str(e.value)) == (content_type == "text/event-stream")


def test_the_key_is_redacted_from_server_words(serve, tmp_path, waits, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-SECRET-789")
    error = {"error": {"message": "Incorrect API key provided: sk-live-SECRET-789"}}
    s = serve(lambda kind, b, n: (401, error, None))
    with pytest.raises(bimi.LLMError) as e:
        make_client(s.url, tmp_path).chat(HI)
    assert "SECRET" not in str(e.value) and "Incorrect API key provided: ***" in str(e.value)
    assert "OPENAI_API_KEY" in str(e.value)


# ----------------------------------------------------------------------------- 2. Retry-After


@pytest.mark.parametrize("headers, expected", [
    ({"Retry-After": "2"}, 2.0),
    ({"Retry-After": "0"}, 0.0),
    ({"Retry-After": "120"}, 60.0),                  # clamped
    ({"Retry-After": "-5"}, None),                   # negative: own backoff
    ({"Retry-After": "nan"}, None),
    ({"Retry-After": "86400"}, None),                # absurd
    ({"Retry-After": "soon"}, None),
    ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 60.0),
    ({"x-ratelimit-reset-requests": "20ms"}, 0.02),
    ({"x-ratelimit-reset-tokens": "1m30s"}, 60.0),
    ({}, None),
])
def test_retry_after_forms(headers, expected):
    got = bimi.retry_after_seconds(headers)
    assert got == expected if expected is None else abs(got - expected) < 1e-9


def test_retry_after_http_date(serve, tmp_path, waits):
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= bimi.retry_after_seconds({"Retry-After": date}) <= 30
    s = serve(lambda kind, b, n: (429, {"error": {"message": "slow down"}}, {"Retry-After": date})
              if n == 1 else (200, chat_reply(good_answer()), None))
    assert make_client(s.url, tmp_path).chat(HI) == good_answer()
    assert len(waits) == 1 and 28 <= waits[0] <= 30
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert bimi.retry_after_seconds({"Retry-After": past}) is None


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/v1", "http://[::1/v1"])
def test_only_llm_errors_escape_the_client(tmp_path, waits, url):
    with pytest.raises(bimi.LLMError):
        make_client(url, tmp_path, max_retries=1).chat(HI)


# --------------------------------------------------------------------- 3. never cache a non-answer


NON_ANSWERS = {
    "content null, cut": {"id": "x", "model": "m", "choices": [{
        "index": 0, "finish_reason": "length",
        "message": {"role": "assistant", "content": None, "reasoning": "Let me see"}}]},
    "empty text, cut": chat_reply("", "length"),
    "content a number": chat_reply(42),
    "no choices": {"id": "x", "object": "chat.completion", "model": "m", "choices": []},
}


@pytest.mark.parametrize("label", list(NON_ANSWERS))
def test_a_non_answer_is_not_cached_and_a_fixed_server_is_asked_again(serve, tmp_path, waits,
                                                                      label):
    fixed = {"on": False}
    s = serve(lambda kind, b, n: (
        200, chat_reply(good_answer()) if fixed["on"] else NON_ANSWERS[label], None))
    with pytest.raises(bimi.LLMError) as e:
        make_client(s.url, tmp_path).chat(HI)
    assert e.value.per_user and cache_files(tmp_path) == []
    if "cut" in label:
        assert "--max_tokens" in str(e.value)
    fixed["on"] = True
    client = make_client(s.url, tmp_path)
    assert client.chat(HI) == good_answer() and client.requests == 1 and len(s.log) == 2


def test_a_cut_reply_with_text_is_returned_but_not_cached(serve, tmp_path, waits):
    s = serve(lambda kind, b, n: (200, chat_reply('{"interests": [{"name": "Nail', "length"), None))
    reply = make_client(s.url, tmp_path).chat(HI)
    assert reply.finish_reason == "length" and cache_files(tmp_path) == []
    assert s.log[0][1]["max_tokens"] == bimi.EsimConfig().max_tokens


def test_embeddings_wrong_count_or_nan_are_rejected_and_not_cached(serve, tmp_path, waits):
    mode = {"now": "one vector"}

    def reply(kind, b, n):
        body = embeddings_reply(b["input"])
        if mode["now"] == "one vector":
            body["data"] = body["data"][:1]
        elif mode["now"] == "nan":
            body["data"][3]["embedding"] = [float("nan")] * 16
            return 200, json.dumps(body), None   # the bare NaN token, as a Python server writes it
        return 200, body, None
    s = serve(reply)
    texts = [f"interest {k}: likes thing {k}" for k in range(5)]
    with pytest.raises(bimi.LLMError, match="returned 1 vectors for 5 texts"):
        make_client(s.url, tmp_path).embed(texts)
    mode["now"] = "nan"
    with pytest.raises(bimi.LLMError, match="NaN or inf for 1 text.*likes thing 3"):
        make_client(s.url, tmp_path).embed(texts)
    assert cache_files(tmp_path) == []
    mode["now"] = "fixed"
    vectors = make_client(s.url, tmp_path).embed(texts)
    assert vectors.shape == (5, 16) and np.isfinite(vectors).all() and len(s.log) == 3


# ----------------------------------------------------------------------------- 4. reply shapes


def named(names):
    return [(n, f"Buys {n.lower()}.") for n in names]


FINAL = ("Nail polish", "Skin care", "Fragrance", "Hair styling")


@pytest.mark.parametrize("content", [
    f"<think>\nFirst guess: {good_answer(['Makeup', 'Lips', 'Eyes', 'Nails'])}\nToo coarse."
    f"\n</think>\n{good_answer()}",
    "<think>maybe " + json.dumps({"interests": json.loads(good_answer())["interests"][:3]})
    + " needs 4</think>" + good_answer(),
    f"Sure! Here you go:\n```json\n{good_answer()}\n```\nAnything else?",
    [{"type": "text", "text": good_answer()[:20]}, {"type": "text", "text": good_answer()[20:]}],
])
def test_reply_shapes_real_servers_send(serve, tmp_path, waits, content):
    s = serve(lambda kind, b, n: (200, chat_reply(content), None))
    reply = make_client(s.url, tmp_path).chat(HI)
    assert bimi.parse_interests(reply, 4) == named(FINAL)


@pytest.mark.parametrize("text, needle", [
    ("<think>I should list their interests as " + good_answer(), "inside its <think>"),
    (json.dumps({"interests": [{"name": "<2 to 5 words>", "description": "<one sentence>"}] * 4}),
     "placeholder"),
    (json.dumps({"interests": [{"name": "...", "description": "..."}] * 4}), "placeholder"),
    (good_answer(["Skin care", "Fragrance", "skin care", "Nails"]), "repeats the name"),
])
def test_unusable_answers_are_parse_errors(text, needle):
    with pytest.raises(bimi.ParseError, match=needle):
        bimi.parse_interests(text, 4)


# ------------------------------------------------------------------- 5. and 11. one user's failure


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    import data_prep
    folder = str(tmp_path_factory.mktemp("data"))
    data_prep.prepare("synthetic", folder)
    data = bimi.load_dataset(folder, "synthetic")
    return data, bimi.make_split(data)


def run_users(synthetic, client, tmp_path, n_users=20):
    data, split = synthetic
    typical = [{"user": u, "cluster": 0} for u in range(1, n_users + 1)]
    out = tmp_path / f"esim{len(os.listdir(tmp_path))}"
    out.mkdir()
    results, failures = bimi.explicit_interests(data, split, typical, client.cfg, client, str(out))
    return results, failures, [json.loads(x) for x in open(out / "failures.jsonl")]


def prompt_of(synthetic, user):
    data, split = synthetic
    return bimi.render_prompt(data, split.train_seqs[user], 4, 20)[1]["content"]


@pytest.mark.parametrize("refusal", [
    (400, {"error": {"message": "Prompt blocked by the content management policy.",
                     "code": "content_filter"}}, None),
    (400, {"error": {"message": "This model's maximum context length is 4096 tokens; your prompt "
                                "has 5120."}}, None),
    (200, {"id": "x", "object": "chat.completion", "model": "m", "choices": []}, None),
])
def test_one_refused_prompt_is_one_failed_user_and_a_rerun_asks_only_for_it(serve, tmp_path, waits,
                                                                             synthetic, refusal):
    bad = prompt_of(synthetic, 7)
    s = serve(lambda kind, b, n: refusal if b["messages"][1]["content"] == bad
              else (200, chat_reply(good_answer()), None))
    client = make_client(s.url, tmp_path, backend="llm")
    results, failures, written = run_users(synthetic, client, tmp_path)
    assert [f["user"] for f in written] == [7] and results[6] is None
    assert sum(r is not None for r in results) == 19
    assert written[0]["error"].startswith(s.url)
    before = len(s.log)
    again = make_client(s.url, tmp_path, backend="llm")
    run_users(synthetic, again, tmp_path)
    # only the refused user is asked again
    assert len(s.log) - before == 1 and again.cache_hits == 19


@pytest.mark.parametrize("status", [401, 403, 404])
def test_key_and_endpoint_errors_stop_esim_at_once(serve, tmp_path, waits, synthetic, status):
    s = serve(lambda kind, b, n: (status, {"error": {"message": "no"}}, None))
    with pytest.raises(bimi.LLMError, match=f"HTTP {status}"):
        run_users(synthetic, make_client(s.url, tmp_path, backend="llm", concurrency=1), tmp_path)
    assert len(s.log) == 1


def test_more_than_20_percent_failed_stops_early(serve, tmp_path, waits, synthetic):
    s = serve(lambda kind, b, n: (400, {"error": {"message": "content_filter"}}, None))
    with pytest.raises(SystemExit, match="5 of 20 typical users failed"):
        run_users(synthetic, make_client(s.url, tmp_path, backend="llm", concurrency=1), tmp_path)
    assert len(s.log) == 5


def test_a_cut_reply_is_not_quoted_whole_into_the_repair(serve, tmp_path, waits, synthetic):
    long_cut = '{"interests": [{"name": "Nail polish", "description": "' + "very " * 2000
    s = serve(lambda kind, b, n: (200, chat_reply(long_cut, "length"), None)
              if len(b["messages"]) == 2 else (200, chat_reply(good_answer()), None))
    data, split = synthetic
    client = make_client(s.url, tmp_path)
    assert bimi.llm_interests(client, data, split.train_seqs[1], 4, 20) == named(FINAL)
    repair = s.log[1][1]["messages"]
    assert len(json.dumps(repair)) < len(json.dumps(s.log[0][1]["messages"])) + 1000
    assert "cut by max_tokens" in repair[-1]["content"]


def test_a_timeout_is_not_resent_and_later_requests_go_one_at_a_time(serve, tmp_path, synthetic,
                                                                     monkeypatch):
    in_flight, most = [0], [0]

    def reply(kind, b, n):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        time.sleep(1.5 if n == 1 else 0.05)
        in_flight[0] -= 1
        return 200, chat_reply(good_answer()), None
    s = serve(reply)
    client = make_client(s.url, tmp_path, backend="llm", timeout=1.0, concurrency=4)
    results, failures, written = run_users(synthetic, client, tmp_path, n_users=12)
    assert len(written) == 1 and "no reply within --timeout 1 s" in written[0]["error"]
    assert len(s.log) == 12 and client.serial  # nothing re-sent


def test_model_name_mismatch_is_warned_once(serve, tmp_path, waits):
    s = serve(lambda kind, b, n: (200, chat_reply(good_answer(), model="llama-3-8b"), None))
    logs = []
    client = make_client(s.url, tmp_path, logs, chat_model="gpt-4o-mini")
    client.chat(HI)
    client.chat(HI + [{"role": "user", "content": "again"}])
    assert sum("answers as 'llama-3-8b'" in m for m in logs) == 1


def test_structured_output_falls_back_through_the_shapes_and_is_remembered(serve, tmp_path, waits):
    schema = bimi.interests_schema(4)

    # llama-cpp-python: json_schema -> HTTP 500 with a validation message
    def llama_cpp(kind, b, n):
        fmt = b.get("response_format") or {}
        if fmt.get("type") == "json_schema":
            return 500, {"error": {"message": "1 validation error for CreateChatCompletionRequest"
                                              "\nresponse_format: Input should be 'text' or "
                                              "'json_object'"}}, None
        return 200, chat_reply(good_answer()), None
    s = serve(llama_cpp)
    client = make_client(s.url, tmp_path)
    client.chat(HI, schema)
    client.chat(HI + [{"role": "user", "content": "again"}], schema)
    shapes = [(b.get("response_format") or {}).get("type") for _, b, _ in s.log]
    assert shapes == ["json_schema", "json_object", "json_object"]
    assert s.log[1][1]["response_format"]["schema"] == schema

    def plain_only(kind, b, n):
        if "response_format" in b:
            return 400, {"error": {"message": "Unknown parameter: 'response_format'."}}, None
        return 200, chat_reply(good_answer()), None
    s = serve(plain_only)
    client = make_client(s.url, tmp_path / "plain")
    assert client.chat(HI, schema) == good_answer()
    assert [("response_format" in b) for _, b, _ in s.log] == [True, True, False]


# ----------------------------------------------------------------- 8. outages pass, replies decode
LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
NGINX_503 = "<html><title>503 Service Temporarily Unavailable</title><center>nginx</center></html>"


@pytest.mark.parametrize("status, payload", [(503, LOADING), (503, NGINX_503), (502, "Bad Gateway"),
                                             (500, {"error": {"message": "model is loading"}})])
def test_an_outage_that_passes_is_ridden_out_with_backoff(serve, tmp_path, waits, status, payload):
    # the same answer four times, then the model is loaded: no "same 5xx twice" stop
    s = serve(lambda kind, b, n: (status, payload, None) if n <= 4
              else (200, chat_reply(good_answer()), None))
    assert make_client(s.url, tmp_path).chat(HI) == good_answer()
    assert len(s.log) == 5 and len(waits) == 4 and waits[3] > waits[0]


def test_a_reply_cut_mid_body_is_retried_then_fails_that_user_only(serve, tmp_path, waits):
    whole = json.dumps(chat_reply(good_answer()))
    cut = lambda kind, b, n: (200, whole[:60], {"X-Promise-Length": str(len(whole))})
    s = serve(lambda kind, b, n: cut(kind, b, n) if n == 1 else (200, whole, None))
    assert make_client(s.url, tmp_path).chat(HI) == good_answer() and len(s.log) == 2
    always = serve(cut)
    with pytest.raises(bimi.LLMError, match="broke off mid-body") as e:
        make_client(always.url, tmp_path / "other", max_retries=2).chat(HI)
    assert e.value.per_user and len(always.log) == 3


def test_json_is_read_as_utf8_whatever_charset_the_header_claims(serve, tmp_path, waits):
    names = ("Crème brûlée", "Rouge à lèvres", "口紅", "Fragrance")
    answer = json.dumps({"interests": [{"name": n, "description": n} for n in names]},
                        ensure_ascii=False)
    s = serve(lambda kind, b, n: (200, json.dumps(chat_reply(answer), ensure_ascii=False).encode(),
                                  {"Content-Type": "application/json; charset=iso-8859-1"}))
    client = make_client(s.url, tmp_path)
    assert client.chat(HI) == answer
    assert make_client(s.url, tmp_path).chat(HI) == answer and len(s.log) == 1  # cached as meant


def test_base64_embeddings_and_tool_call_answers_are_read(serve, tmp_path, waits):
    def reply(kind, b, n):
        if kind == "embeddings":
            vectors = [np.arange(1, 5, dtype="<f4") * (i + 1) for i in range(len(b["input"]))]
            return 200, {"data": [{"index": i, "embedding": __import__("base64").b64encode(
                v.tobytes()).decode()} for i, v in enumerate(vectors)]}, None
        call = {"type": "function", "function": {"name": "answer", "arguments": good_answer()}}
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return 200, {"choices": [{"message": message, "finish_reason": "tool_calls"}]}, None
    s = serve(reply)
    client = make_client(s.url, tmp_path)
    vectors = client.embed(["a", "b"])
    assert np.allclose(vectors, np.arange(1, 5) / np.linalg.norm(np.arange(1, 5)), atol=1e-6)
    assert s.log[0][1]["encoding_format"] == "float"
    assert client.chat(HI) == good_answer()


def test_compression_that_does_not_match_its_header_is_named(serve, tmp_path, waits):
    body = json.dumps(chat_reply(good_answer())).encode()
    s = serve(lambda kind, b, n: (200, __import__("gzip").compress(body), None))
    with pytest.raises(bimi.LLMError, match="gzip data without a Content-Encoding header"):
        make_client(s.url, tmp_path).chat(HI)
    s = serve(lambda kind, b, n: (200, body, {"Content-Encoding": "gzip"}))
    with pytest.raises(bimi.LLMError, match="not compressed as its Content-Encoding header says"):
        make_client(s.url, tmp_path).chat(HI)


# --------------------------------------------------------------- 9. the cache is never the problem


def test_a_truncated_cache_entry_is_a_miss_and_is_written_again(serve, tmp_path, waits):
    s = serve(lambda kind, b, n: (200, chat_reply(good_answer()), None))
    logs = []
    make_client(s.url, tmp_path).chat(HI)
    (entry,) = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "cache") for f in fs]
    open(entry, "w").close()  # a crash or a full disk left it empty
    assert make_client(s.url, tmp_path, logs).chat(HI) == good_answer() and len(s.log) == 2
    assert any(entry in m and "asking again" in m for m in logs)
    assert json.load(open(entry))["reply"]["text"] == good_answer()


def test_a_cache_that_cannot_be_written_warns_once_and_the_answers_are_used(serve, tmp_path, waits):
    s = serve(lambda kind, b, n: (200, chat_reply(good_answer()), None))
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    logs = []
    client = make_client(s.url, tmp_path, logs)
    assert client.chat(HI) == good_answer() and client.chat(HI + HI) == good_answer()
    assert sum("cannot write the request cache" in m for m in logs) == 1


def test_an_embedding_model_that_changed_width_under_its_name_is_one_clear_error(serve, tmp_path,
                                                                                 waits):
    width = [8]
    s = serve(lambda kind, b, n: (200, {"data": [{"index": i, "embedding": [1.0] * width[0]}
                                                 for i in range(len(b["input"]))]}, None))
    make_client(s.url, tmp_path, embed_batch=2).embed(["a", "b"])
    width[0] = 16  # the server now serves another model under the same name
    widths = r"changed since answers were cached \(widths \[8, 16\]"
    with pytest.raises(bimi.LLMError, match=widths):
        make_client(s.url, tmp_path, embed_batch=2).embed(["a", "b", "c"])
    (tmp_path / "cache").rename(tmp_path / "old")
    make_client(s.url, tmp_path, embed_batch=2).embed(["a", "b"])  # a model of the same width next:
    salt = [0.0]
    s.reply = lambda kind, b, n: (200, {"data": [{"index": i, "embedding": [1.0 + salt[0], 1.0] * 8}
                                                 for i in range(len(b["input"]))]}, None)
    salt[0] = 0.5
    with pytest.raises(bimi.LLMError, match="cached texts embed otherwise now"):
        make_client(s.url, tmp_path, embed_batch=2).embed(["a", "b", "c"])
    assert make_client(s.url, tmp_path, embed_batch=2).embed(["c"]).shape == (1, 16)  # not mixed


# ------------------------------------------------------------------------- 6. configuration errors


@pytest.mark.parametrize("env, options, chat, embed, needle", [
    ({"OPENAI_BASE_URL": "localhost:1234/v1"}, {}, True, False,
     "OPENAI_BASE_URL is 'localhost:1234/v1': it needs http://"),
    ({}, {"base_url": "127.0.0.1:8000/v1"}, True, False, "--base_url is '127.0.0.1:8000/v1'"),
    ({}, {}, True, False, "OPENAI_BASE_URL is empty"),
    ({"OPENAI_BASE_URL": "http://h/v1"}, {"chat_model": "  "}, True, False,
     "--chat_model (or BIMI_CHAT_MODEL) is empty"),
    ({}, {}, False, True, "an embeddings endpoint (--embedder api)"),
    ({"OPENAI_BASE_URL": "http://h/v1", "OPENAI_EMBED_BASE_URL": "h:8101"}, {}, False, True,
     "OPENAI_EMBED_BASE_URL is 'h:8101'"),
])
def test_configuration_errors_name_the_setting_before_any_request(monkeypatch, env, options, chat,
                                                                  embed, needle):
    for var in ("OPENAI_BASE_URL", "OPENAI_EMBED_BASE_URL", "BIMI_CHAT_MODEL", "BIMI_EMBED_MODEL"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(bimi.LLMError) as e:
        bimi.endpoints(bimi.EsimConfig(**options), chat=chat, embed=embed)
    assert needle in str(e.value) and "e.g." in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------ 7. no non-finite number goes further


def test_kmeans_rejects_nan_and_caps_clusters_at_distinct_points(capsys):
    x = torch.randn(40, 8)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="1 with NaN or inf"):
        bimi.kmeans(x, 4)
    sites = torch.eye(3).repeat(10, 1)  # 30 points, 3 distinct
    capsys.readouterr()
    centroids, assign, inertia = bimi.kmeans(sites, 8, n_init=2, seed=1)
    logs = capsys.readouterr().out.splitlines()
    assert len(centroids) == 3 and len(torch.unique(centroids, dim=0)) == 3 and inertia == 0
    assert logs == ["warning: 3 distinct points for 8 clusters: using 3 clusters"]


def test_a_nan_loss_fails_the_run_and_it_is_never_reused(synthetic_dir, tmp_path, monkeypatch,
                                                         capsys):
    cfg = bimi.Config(dataset="synthetic", data_dir=synthetic_dir, out_dir=str(tmp_path / "runs"),
                      max_epochs=1)
    real_step, calls = bimi.training_step, [0]

    def step(*args, **kw):  # the real step, whose loss turns NaN at the 3rd call
        calls[0] += 1
        loss = real_step(*args, **kw)
        return math.nan if calls[0] == 3 else loss
    monkeypatch.setattr(bimi, "training_step", step)
    with pytest.raises(bimi.TrainingError, match="loss became nan at epoch 1, step 3"):
        bimi.train(cfg)
    record = json.load(open(os.path.join(bimi.run_dir(cfg), "metrics.json")))
    assert record["status"] == "failed" and "nan" in record["error"]
    monkeypatch.setattr(bimi, "training_step", real_step)
    capsys.readouterr()
    bimi.train(cfg)
    logs = capsys.readouterr().out.splitlines()
    assert not any("reusing" in m for m in logs)
    assert json.load(open(os.path.join(bimi.run_dir(cfg), "metrics.json")))["status"] == "done"
