"""reproduce's machinery: the plan's commands make exactly the table's runs, parallel workers give
the same numbers as one process, tuned settings apply unless an option is typed, and a run made
with another torch is reused with a warning."""
import json
import os
import shlex
import subprocess

import numpy as np
import pytest

import bimi


def table_args(data_dir, out_dir, *more):
    return ["reproduce", "--dataset", "ml", "--data_dir", data_dir, "--out_dir", out_dir,
            "--seeds", "1", "--models", "comirec-sa", "--ablations", "0", "--max_epochs", "2",
            "--clusters", "5", *more]


def test_plan_prints_every_run_once_and_then_reproduce_makes_none(own_dataset, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    bimi.main(table_args(own_dataset, "runs", "--plan"))
    lines = capsys.readouterr().out.splitlines()
    assert not os.path.exists("runs")  # a plan trains nothing
    assert [l for l in lines if l in ("# backbones", "# ESIMs", "# EIMF runs")] == \
        ["# backbones", "# ESIMs", "# EIMF runs"]
    commands = [l for l in lines if not l.startswith("#")]
    # the backbone; ESIM and EIMF, real and shuffled-semantics control
    assert [shlex.split(c)[3] for c in commands] == ["train", "esim", "esim", "train", "train"]
    assert all(c.startswith("OMP_NUM_THREADS=1 ") for c in commands)  # one thread, as a worker
    assert sum("--shuffle" in c for c in commands) == 2
    assert sum("--eimf categories" in c for c in commands) == 2
    # an ESIM has no EIMF weights
    assert not any("--lambda" in c for c in commands if " esim " in c)
    assert lines[-1].startswith("# once these are finished, --plan again adds")
    for c in commands:
        run = subprocess.run(c, shell=True, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    bimi.main(table_args(own_dataset, "runs", "--jobs", "1"))
    out = capsys.readouterr().out
    for stage, n in (("backbones", 1), ("ESIMs", 2), ("EIMF runs", 2)):
        assert f"== {stage}: 0 to make, {n} finished" in out
    assert "comirec-sa, real over shuffled semantics: R@20" in out


def test_llm_tables_of_two_models_have_two_names(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    cfg, opts = bimi.Config(dataset="beauty"), bimi.CommandOptions(ablations=0)
    ecfg = bimi.EsimConfig(backend="llm", embedder="api")
    given = {"backend", "embedder", "ablations"}  # what reproduce.sh types; models come from env
    names = set()
    for model in ("smollm2-135m-instruct", "Qwen/Qwen2.5-7B-Instruct"):
        monkeypatch.setenv("BIMI_CHAT_MODEL", model)
        names.add(bimi.table_name(cfg, ecfg, opts, given))
    assert len(names) == 2 and "beauty-ablations=0-backend=llm-chat_model=Qwen_Qwen2.5-7B-" \
        "Instruct-embed_model=text-embedding-3-small-embedder=api" in names
    assert bimi.table_name(cfg, bimi.EsimConfig(), opts, {"ablations"}) == "beauty-ablations=0"


def test_parallel_workers_give_the_numbers_of_one_process(own_dataset, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    tables = []
    for jobs in ("2", "1"):
        bimi.main(table_args(own_dataset, f"runs{jobs}", "--seeds", "2", "--jobs", jobs))
        out = capsys.readouterr().out
        assert ("(2 at once)" in out) == (jobs == "2") and "== EIMF runs: 4 to make" in out
        name = "ml-ablations=0-clusters=5-max_epochs=2-models=comirec-sa-seeds=2"
        tables.append(json.load(open(f"results/{name}.json")))
    for parallel, serial in zip(*(t["rows"] for t in tables)):
        assert parallel["row"] == serial["row"] and parallel["tests"] == serial["tests"]
        assert parallel.get("gain_pct") == serial.get("gain_pct")
    assert tables[0]["meta"]["jobs"] == 2 and tables[1]["meta"]["jobs"] == 1


def test_tuned_settings_apply_per_dataset_and_backbone_unless_typed(own_dataset, monkeypatch):
    monkeypatch.setattr(bimi, "TUNED", {
        ("ml", "comirec-sa"): {"lr": 0.003}, ("beauty", "comirec-sa"): {"lr": 0.001},
        ("*", "comirec-sa"): {"lambda_align": 0.2, "lambda_pred": 1.0}})
    cfg, ecfg = bimi.Config(dataset="ml", data_dir=own_dataset), bimi.EsimConfig()
    rows = bimi.table_rows("categories", ["comirec-sa"], True)
    runs, stages = bimi.table_runs(cfg, ecfg, rows, 1, given=())
    made = {out: c for jobs in stages.values() for out, (_, c, _) in jobs.items()}
    assert {c.lr for c in made.values()} == {0.003}
    eimf = {label: made[runs[label][0]] for label in runs if "EIMF" in label}
    assert eimf["comirec-sa + EIMF"].lambda_align == 0.2
    assert eimf["comirec-sa + EIMF"].lambda_pred == 1.0
    assert eimf["comirec-sa + EIMF w/o alignment"].lambda_align == 0.0  # the row's own setting wins
    assert eimf["comirec-sa + EIMF w/o alignment"].lambda_pred == 1.0
    # EIMF weights are not a backbone's identity: its folder is the untuned backbone's
    untuned = bimi.dataclasses.replace(cfg, model="comirec-sa", lr=0.003)
    assert runs["comirec-sa"][0] == bimi.run_dir(untuned)
    runs, stages = bimi.table_runs(cfg, ecfg, rows, 1, given={"lr"})
    assert {c.lr for jobs in stages.values() for _, c, _ in jobs.values()} == {cfg.lr}


def test_a_run_made_with_another_torch_is_reused_with_one_warning(tmp_path, capsys):
    for n in range(2):
        os.makedirs(tmp_path / f"run{n}")
        bimi.write_json(str(tmp_path / f"run{n}" / "metrics.json"), {
            "status": "done", "code": {**bimi.code_version(), "torch": "1.13.1"}})
        assert bimi.finished(str(tmp_path / f"run{n}"))["status"] == "done"
    out = capsys.readouterr().out
    warning = f"warning: reusing runs made by other torch (1.13.1 vs {bimi.torch.__version__} now)"
    assert out.count(warning) == 1
    assert out.count("reusing finished run") == 2


def test_an_interrupt_after_the_atomic_replace_stays_an_interrupt(tmp_path, monkeypatch):
    def replace_then_interrupt(src, dst):
        os.rename(src, dst)
        raise KeyboardInterrupt
    monkeypatch.setattr(bimi.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        bimi.write_json(str(tmp_path / "metrics.json"), {"status": "done"})
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_out_of_memory_is_one_line_and_other_runtime_errors_are_bugs():
    line = bimi.error_line(RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. "
                                        "DefaultCPUAllocator: can't allocate memory: you tried to "
                                        "allocate 4000000000000 bytes."))
    assert line.startswith("error: out of memory (") and "--batch_size" in line
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bimi.error_line(RuntimeError("shape mismatch"))


def test_a_backbone_scoring_zero_gives_no_gain_and_no_warning(recwarn):
    zero, some = np.zeros((2, 50)), np.ones((2, 50))
    assert all(np.isnan(bimi.gain_interval(zero, some)))
    assert bimi.interval_text({"gain": np.nan, "ci95": [np.nan, np.nan]}).startswith("n/a")
    assert not recwarn.list


@pytest.mark.parametrize("real, contrast, says", [
    ((+5, [+2, +8]), (+4, [+1, +7]), "the real semantics beat shuffled ones"),
    ((+5, [+2, +8]), (-1, [-4, +2]), "the gain is not from the semantics"),
    ((+5, [+2, +8]), (+2, [-1, +5]), "within noise"),
    ((-5, [-8, -2]), (+3, [-1, +7]), "no gain here for the semantics to explain"),
])
def test_the_controls_verdict(real, contrast, says):
    as_metrics = lambda g: {m: {"gain": g[0], "ci95": g[1]} for m in bimi.GAIN_METRICS}
    assert says in bimi.verdict(as_metrics(real), as_metrics(contrast))
