"""A run's folder (its identity) changes with everything that changes its numbers, and with
nothing else: reuse only what would give the same numbers."""
import json
import os
import shutil

import pytest

import bimi

ENV = ("OPENAI_BASE_URL", "OPENAI_EMBED_BASE_URL", "BIMI_CHAT_MODEL", "BIMI_EMBED_MODEL")


@pytest.fixture
def base(synthetic_dir, tmp_path, monkeypatch):
    """A copy of the synthetic data and an LLM + API-embedder EIMF config pointing at it."""
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    cfg = bimi.Config(dataset="synthetic", data_dir=str(data), out_dir=str(tmp_path / "runs"),
                      eimf="llm")
    ecfg = bimi.EsimConfig(backend="llm", embedder="api")
    return cfg, ecfg


def folder(cfg, ecfg):
    return bimi.run_dir(cfg, bimi.resolve_esim(ecfg))


def test_model_names_from_the_environment_are_part_of_the_identity(base, monkeypatch):
    cfg, ecfg = base
    first = folder(cfg, ecfg)
    monkeypatch.setenv("BIMI_CHAT_MODEL", "gpt-4o")
    assert folder(cfg, ecfg) != first
    monkeypatch.setenv("BIMI_CHAT_MODEL", "gpt-4o-mini")  # the default, named: the same run
    assert folder(cfg, ecfg) == first
    monkeypatch.setenv("BIMI_EMBED_MODEL", "nomic-embed-text")
    assert folder(cfg, ecfg) != first
    assert bimi.resolve_esim(ecfg).embed_model == "nomic-embed-text"


def test_data_contents_prompts_and_device_are_part_of_the_identity(base, monkeypatch, tmp_path):
    cfg, ecfg = base
    first, backbone = folder(cfg, ecfg), bimi.run_dir(bimi.dataclasses.replace(cfg, eimf=""))
    seq = os.path.join(cfg.data_dir, "synthetic", "sequences.txt")
    lines = open(seq).read().splitlines()
    lines[0] = " ".join(lines[0].split()[:-1])  # one interaction fewer
    open(seq, "w").write("\n".join(lines) + "\n")
    assert folder(cfg, ecfg) != first
    assert bimi.run_dir(bimi.dataclasses.replace(cfg, eimf="")) != backbone
    changed = folder(cfg, ecfg)
    prompts = tmp_path / "prompts"
    shutil.copytree(bimi.PROMPTS, prompts)
    monkeypatch.setattr(bimi, "PROMPTS", str(prompts))
    with open(prompts / "user.txt", "a") as f:
        f.write("Be concise.\n")
    assert folder(cfg, ecfg) != changed
    after_prompt = folder(cfg, ecfg)
    monkeypatch.setattr(bimi, "resolve_device", lambda name: bimi.torch.device("cuda"))
    assert folder(cfg, ecfg) != after_prompt


def test_paths_batch_sizes_and_urls_are_not(base, monkeypatch, tmp_path):
    cfg, ecfg = base
    first = folder(cfg, ecfg)
    moved = tmp_path / "elsewhere"
    shutil.copytree(cfg.data_dir, moved)
    assert folder(bimi.dataclasses.replace(cfg, data_dir=str(moved)), ecfg) == first
    assert folder(bimi.dataclasses.replace(cfg, eval_batch=64), ecfg) == first
    # REMI's weights: remi runs only
    assert folder(bimi.dataclasses.replace(cfg, rlambda=3.0), ecfg) == first
    remi = bimi.dataclasses.replace(cfg, model="remi")
    assert folder(bimi.dataclasses.replace(remi, rlambda=3.0), ecfg) != folder(remi, ecfg)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://10.1.2.3:8000/v1")
    assert folder(cfg, ecfg) == first
    assert folder(cfg, bimi.dataclasses.replace(ecfg, base_url="https://api.example.com/v1",
                                                concurrency=1, timeout=5.0)) == first
    # a categories run does not depend on chat model names at all
    cats = bimi.dataclasses.replace(cfg, eimf="categories")
    plain = folder(cats, bimi.EsimConfig())
    monkeypatch.setenv("BIMI_CHAT_MODEL", "gpt-4o")
    assert folder(cats, bimi.EsimConfig()) == plain


def test_saved_configs_hold_resolved_names_and_the_code_version(synthetic_dir, tmp_path,
                                                                monkeypatch, capsys):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BIMI_EMBED_MODEL", "my-embedder")
    cfg = bimi.Config(dataset="synthetic", data_dir=synthetic_dir, out_dir=str(tmp_path / "runs"),
                      max_epochs=1, eimf="categories")
    ecfg = bimi.EsimConfig(clusters=10, prototypes=8)
    out = bimi.train(cfg, ecfg)
    saved = json.load(open(os.path.join(out, "config.json")))
    # not used by this backend
    assert saved["esim"]["embed_model"] == "" and saved["esim"]["chat_model"] == ""
    assert saved["code"]["bimi_sha256"] == bimi.code_version()["bimi_sha256"]
    assert json.load(open(os.path.join(out, "metrics.json")))["code"] == bimi.code_version()
    esim = json.load(open(os.path.join(saved["esim_dir"], "config.json")))
    assert esim["esim_config"]["backend"] == "categories"
    # a finished run made by other code is reused with one warning line
    record = json.load(open(os.path.join(out, "metrics.json")))
    record["code"] = {"bimi_sha256": "0123456789ab", "git": "abc"}
    bimi.write_json(os.path.join(out, "metrics.json"), record)
    capsys.readouterr()
    assert bimi.train(cfg, ecfg) == out
    logs = capsys.readouterr().out.splitlines()
    assert sum("made by other code (abc vs" in m for m in logs) == 1
