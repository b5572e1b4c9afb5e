"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat and embeddings JSON and can be
scripted to fail. Run it standalone (`python tests/fake_llm.py`, it prints its URL) to point the
kit at it."""
import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def start_server(on_post):
    """A threaded HTTP server on 127.0.0.1 (a free port) that calls on_post(handler, body) with each
    POST's parsed JSON body; returns the server (its .shutdown() stops it) and its root URL."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            on_post(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def fake_embedding(text, dim=16):
    digest = hashlib.sha256(text.encode()).digest()
    return [(b - 127.5) / 127.5 for b in digest[:dim]]


def fake_interests(prompt, n):
    """A deterministic, well-formed answer built from the category words in the prompt."""
    words = sorted({w for line in prompt.splitlines() if "[" in line
                    for w in line[line.index("[") + 1:].rstrip("]").split(" > ")[-1:]})
    words = (words * n)[:n] if words else [f"topic {k}" for k in range(n)]
    return {"interests": [{"name": f"{w} fan {k + 1}", "description": f"Buys {w.lower()} products."}
                          for k, w in enumerate(words)]}


class FakeLLM:
    """`script` holds behaviours for the next requests (FIFO), default "ok": 429, 500, hang, drop,
    badjson, prose, wrong_count, 401, 404, block (never answers until released)."""

    def __init__(self, n_interests=4, hang_s=3.0, verbose=False):
        self.script, self.log, self.completed = [], [], []
        self.n_interests, self.hang_s, self.verbose = n_interests, hang_s, verbose
        self.lock, self.release = threading.Lock(), threading.Event()
        self.httpd, root = start_server(self._post)
        self.url = root + "/v1"

    def _post(self, handler, body):
        with self.lock:
            kind = handler.path.rsplit("/", 1)[-1]
            behaviour = self.script.pop(0) if self.script else "ok"
            self.log.append({"path": handler.path, "kind": kind, "body": body,
                             "behaviour": behaviour, "auth": handler.headers.get("Authorization")})
        self.respond(handler, kind, body, behaviour)

    def send(self, handler, status, payload, headers=()):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)
        with self.lock:
            self.completed.append((handler.path.rsplit("/", 1)[-1], status))
            if self.verbose:
                print(f"{handler.path} {status}", flush=True)

    def respond(self, handler, kind, body, behaviour):
        if behaviour == "429":
            return self.send(handler, 429, {"error": {"message": "rate limited"}},
                             [("Retry-After", "0.05")])
        if behaviour == "500":
            return self.send(handler, 500, {"error": {"message": "internal error"}})
        if behaviour == "401":
            return self.send(handler, 401, {"error": {"message": "Incorrect API key provided"}})
        if behaviour == "404":
            return self.send(handler, 404,
                             {"error": {"message": f"The model {body['model']} does not exist"}})
        if behaviour == "drop":
            handler.close_connection = True
            return
        if behaviour == "hang":
            time.sleep(self.hang_s)
        if behaviour == "block":
            self.release.wait()
            return
        if behaviour == "badjson":
            return self.send(handler, 200, b"{not json")
        if kind == "embeddings":
            data = [{"object": "embedding", "index": i, "embedding": fake_embedding(t)}
                    for i, t in enumerate(body["input"])]
            return self.send(handler, 200, {"object": "list", "data": data, "model": body["model"]})
        answer = fake_interests(body["messages"][1]["content"], self.n_interests)
        if behaviour == "wrong_count":
            answer["interests"] = answer["interests"][:-1]
        content = json.dumps(answer)
        if behaviour == "prose":
            content = (f"Sure! Here is the analysis:\n```json\n{content}\n```\nLet me know if you "
                       "need more.")
        message = {"role": "assistant", "content": content}
        return self.send(handler, 200, {
            "id": "x", "object": "chat.completion", "model": body["model"] + "-0613",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

    def count(self, kind, status=200):
        return sum(1 for k, s in self.completed if k == kind and s == status)

    def close(self):
        self.release.set()
        self.httpd.shutdown()


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 whose every reply is chosen by a function of the request:
    reply(kind, body, n) -> (status, payload, headers); payload is a dict (sent as JSON), bytes or
    str (sent as they are; a header may set the Content-Type, and X-Promise-Length a Content-Length
    larger than the body, which is then cut off). n counts requests from 1.
    `log` holds (kind, body, headers) of every request."""

    def __init__(self, reply):
        self.reply, self.log, self.lock = reply, [], threading.Lock()
        self.httpd, self.root = start_server(self._post)
        self.url = self.root + "/v1"

    def _post(self, handler, body):
        kind = handler.path.rsplit("/", 1)[-1]
        with self.lock:
            self.log.append((kind, body, dict(handler.headers)))
            n = len(self.log)
        status, payload, headers = self.reply(kind, body, n)
        data = payload.encode() if isinstance(payload, str) else \
            payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = dict(headers or {})
        promised = int(headers.pop("X-Promise-Length", len(data)))  # more than sent: a cut body
        handler.send_response(status)
        handler.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
        handler.send_header("Content-Length", str(promised))
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)
        handler.close_connection = promised != len(data)

    def close(self):
        self.httpd.shutdown()


def chat_reply(content, finish_reason="stop", model="m"):
    """An OpenAI chat.completion body."""
    return {"id": "x", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish_reason}]}


def embeddings_reply(texts, model="e"):
    """An OpenAI embeddings body, one fake vector per text."""
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": fake_embedding(t)}
                     for i, t in enumerate(texts)]}


if __name__ == "__main__":
    server = FakeLLM(verbose=True)  # one line per answered request
    print(f"fake OpenAI-compatible server at {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()
