"""`tuneforge ui` at the API level (fast tier): run listing and status, live metrics, form validation messages,
path confinement, the Host / Origin / token rules, blind A/B voting and detached jobs."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from tuneforge.errors import UserError  # noqa: E402
from tuneforge.ui import forms  # noqa: E402
from tuneforge.ui.app import create_app  # noqa: E402
from tuneforge.ui.security import Policy  # noqa: E402

ORIGIN = "http://127.0.0.1:7860"


def write_run(runs: Path, name: str, *, summary: dict | None = None, steps: int = 3, checkpoint: bool = False,
              final: bool = False) -> Path:
    run = runs / name
    run.mkdir(parents=True)
    config = {"run_name": name, "stage": "sft", "model": {"name_or_path": "org/base-model"},
              "method": {"name": "lora"}, "data": {"train": ["x.jsonl"]}, "train": {"max_steps": 10}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "tuneforge_run.json").write_text(json.dumps({"tuneforge_run": 1, "run_name": name}))
    with open(run / "metrics.jsonl", "w") as handle:
        for step in range(1, steps + 1):
            handle.write(json.dumps({"event": "log", "step": step, "loss": 3.0 / step, "lr": 1e-3}) + "\n")
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if checkpoint:
        (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
        (run / "checkpoints" / "checkpoint-2" / "COMPLETE").write_text("")
    if final:
        (run / "final").mkdir()
    return run


@pytest.fixture()
def runs(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    return folder


@pytest.fixture()
def client(runs, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "yo"}]}) + "\n")
    app = create_app(runs, data_roots=[data])
    return TestClient(app, base_url=ORIGIN)


def test_runs_listed_with_status_step_and_loss(client, runs):
    write_run(runs, "done", summary={"status": "completed", "global_step": 10, "last_logged_loss": 0.5}, final=True)
    write_run(runs, "stopped", summary={"status": "interrupted", "global_step": 2}, checkpoint=True)
    write_run(runs, "crashed")
    write_run(runs, "live", steps=4)
    (runs / ".hidden").mkdir()
    lock = open(runs / ".live.lock", "w")  # noqa: SIM115 - held for the test, like a training process
    try:
        lock.write(str(os.getpid()))
        lock.flush()
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        rows = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
    finally:
        lock.close()
    assert set(rows) == {"done", "stopped", "crashed", "live"}
    assert rows["done"]["status"] == "finished" and rows["done"]["step"] == 10 and rows["done"]["last_loss"] == 0.5
    assert rows["stopped"]["status"] == "interrupted" and rows["stopped"]["resumable"]
    assert rows["crashed"]["status"] == "failed"
    assert rows["live"]["status"] == "running" and rows["live"]["pid"] == os.getpid()
    assert rows["live"]["step"] == 4 and rows["live"]["last_loss"] == pytest.approx(0.75)
    assert rows["live"]["total"] == 10 and rows["live"]["method"] == "lora" and rows["live"]["base"] == "org/base-model"
    # the lock released: nobody trains into it any more
    assert {r["id"]: r for r in client.get("/api/runs").json()["runs"]}["live"]["status"] == "failed"


def test_metrics_are_read_incrementally_and_never_half_a_line(client, runs):
    run = write_run(runs, "r", steps=2)
    first = client.get("/api/run/metrics", params={"id": "r"}).json()
    assert [e["step"] for e in first["events"]] == [1, 2]
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"event": "log", "step": 3, "loss": 1.0}) + "\n" + '{"event": "log", "st')
    second = client.get("/api/run/metrics", params={"id": "r", "offset": first["offset"]}).json()
    assert [e["step"] for e in second["events"]] == [3]  # the unfinished line waits for its newline
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('ep": 4, "loss": 0.9}\n')
    third = client.get("/api/run/metrics", params={"id": "r", "offset": second["offset"]}).json()
    assert [e["step"] for e in third["events"]] == [4]


def test_run_page_shows_warnings_config_and_eval_results(client, runs):
    run = write_run(runs, "w", summary={"status": "completed"}, final=True)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"event": "warning", "step": 3, "kind": "loss_spike", "message": "loss jumped",
                                 "advice": "lower train.lr"}) + "\n")
    (run / "eval_results.json").write_text(json.dumps([{"model": str(run), "ppl": 3.2, "data": "e.jsonl",
                                                        "metrics": ["ppl"], "time": "2026-12-07 01:00:00"}]))
    detail = client.get("/api/run", params={"id": "w"}).json()
    assert detail["warnings"][0]["advice"] == "lower train.lr"
    assert "run_name: w" in detail["config"]
    assert detail["eval_results"][0]["ppl"] == 3.2
    # Evaluate without a file: the run's data.eval, or a message naming the field
    refused = client.post("/api/run/eval", json={"id": "w"})
    assert refused.status_code == 400 and "Eval data" in refused.json()["error"]
    assert client.get("/api/run", params={"id": "../etc"}).status_code == 400


def tiny_values(data: Path, **extra) -> dict:
    values = {"run_name": "t1", "model.from_config.hidden_size": "64", "model.from_config.num_layers": "2",
              "model.from_config.num_heads": "4", "model.from_config.vocab_size": "512",
              "data.train": str(data), "train.max_steps": "4"}
    return {"values": {**values, **extra}, "widgets": {"data.train": "list"}}


def test_validation_messages_are_tuneforge_validates_naming_the_key(client, tmp_path):
    from tuneforge.config import validate_config

    body = tiny_values(tmp_path / "data" / "train.jsonl", **{"train.lr": "-1", "train.lerning_rate": "1"})
    result = client.post("/api/validate", json=body).json()
    assert not result["ok"]
    by_key = {e["key"]: e["message"] for e in result["errors"]}
    assert set(by_key) == {"train.lr", "train.lerning_rate"}
    with pytest.raises(UserError) as exc:
        validate_config(yaml.safe_load(result["yaml"]), source="form")
    # the very lines `tuneforge validate` prints
    for message in by_key.values():
        assert f"  - {message}" in str(exc.value)
    good = client.post("/api/validate", json=tiny_values(tmp_path / "data" / "train.jsonl",
                                                         **{"train.lr": "1e-4"})).json()
    assert good["ok"], good["errors"]
    written = yaml.safe_load(good["yaml"])
    assert written["train"]["lr"] == 1e-4 and written["output_dir"].endswith("runs/t1")


def test_form_fields_come_from_the_schema_with_labels_help_and_method_fields():
    fields = forms.form_fields()
    every = [f for section in fields["sections"].values() for f in section]
    lr = next(f for f in every if f["key"] == "train.lr")
    assert lr["label"] == "Learning rate (train.lr)" and lr["default"] == 2e-4 and "> 0" in lr["help"]
    scheduler = next(f for f in every if f["key"] == "train.scheduler")
    assert "cosine" in scheduler["choices"] and scheduler["widget"] == "select"
    lora_r = [f for f in every if f["key"] == "method.r" and f["method"] == "lora"]
    assert lora_r and lora_r[0]["default"] == 8
    assert any(f["method"] == "galore" and f["key"] == "method.rank" for f in every)
    assert {"lora", "qlora", "full"} <= set(fields["methods"])
    assert all(f["help"] for f in every if f["key"] in forms.HELP)


def test_paths_outside_runs_and_data_roots_are_refused(client, tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("{}\n")
    result = client.post("/api/validate", json=tiny_values(outside)).json()
    assert not result["ok"]
    assert any(e["key"] == "data.train" and "outside the directories" in e["message"] for e in result["errors"])
    escape = client.post("/api/validate", json=tiny_values(tmp_path / "data" / "train.jsonl",
                                                           output_dir=str(tmp_path / "out"))).json()
    assert any(e["key"] == "output_dir" for e in escape["errors"])
    start = client.post("/api/start", json=tiny_values(outside))
    assert start.status_code == 400
    evaluate = client.post("/api/eval", json={"runs": [], "data": "/etc/passwd"})
    assert evaluate.status_code == 400
    link = tmp_path / "data" / "link.jsonl"
    link.symlink_to(outside)  # a symlink inside a root that points outside is outside
    assert not client.post("/api/validate", json=tiny_values(link)).json()["ok"]


@pytest.mark.parametrize("method,path", [("get", "/api/runs"), ("get", "/"), ("post", "/api/validate"),
                                         ("post", "/api/run/stop"), ("post", "/api/start")])
def test_foreign_host_gets_403_on_every_path(client, method, path):
    response = getattr(client, method)(path, headers={"host": "evil.example:7860"},
                                       **({"json": {}} if method == "post" else {}))
    assert response.status_code == 403 and "Host" in response.text


@pytest.mark.parametrize("path", ["/api/validate", "/api/run/stop", "/api/start", "/api/abtest/vote", "/api/export",
                                  "/api/job/stop", "/api/chat"])
def test_state_changing_request_from_another_origin_gets_403(client, path):
    response = client.post(path, json={}, headers={"origin": "http://evil.example"})
    assert response.status_code == 403 and "origin" in response.text
    cross = client.post(path, json={}, headers={"sec-fetch-site": "cross-site"})
    assert cross.status_code == 403
    same = client.post(path, json={}, headers={"origin": ORIGIN})
    assert same.status_code != 403


def test_non_loopback_bind_needs_a_token(runs):
    with pytest.raises(UserError, match="token"):
        Policy("0.0.0.0")
    app = create_app(runs, host="0.0.0.0", token="s3cret", extra_hosts=("10.1.2.3",))
    client = TestClient(app, base_url="http://10.1.2.3:7860")
    assert client.get("/api/runs").status_code == 403
    assert client.get("/api/runs", headers={"authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/api/runs", headers={"authorization": "Bearer s3cret"}).status_code == 200
    first = client.get("/", params={"token": "s3cret"})
    assert first.status_code == 200 and "tuneforge_ui_token" in first.headers["set-cookie"]
    assert client.get("/api/runs").status_code == 200  # the cookie now carries it


def test_blind_ab_votes_are_scored_and_the_key_stays_on_the_server(client, runs):
    from tuneforge.evaluate.abtest import make_items, write_sheet

    folder = runs / ".tuneforge-ui" / "abtest" / "s1"
    folder.mkdir(parents=True)
    items = make_items(["q1", "q2", "q3"], ["a1", "a2", "a3"], ["b1", "b2", "b3"], seed=3)
    write_sheet(folder / "sheet.html", items, "runs/tuned", "runs/base", seed=3, generation={})
    shown = client.get("/api/abtest", params={"sheet": "s1"}).json()
    text = json.dumps(shown)
    assert "left_model" not in text and "runs/tuned" not in text and '"A"' not in text
    # vote for model A's answer every time, wherever it is shown
    for item in shown["items"]:
        side = "left" if item["left"].startswith("a") else "right"
        assert client.post("/api/abtest/vote", json={"sheet": "s1", "item": item["id"], "vote": side}).status_code == 200
    assert client.post("/api/abtest/vote", json={"sheet": "s1", "item": "q999", "vote": "left"}).status_code == 400
    score = client.get("/api/abtest/score", params={"sheet": "s1"}).json()
    assert score["model_a"] == "runs/tuned" and score["win"] == 3 and score["votes"] == 3
    assert score["win_ci"][0] > 0.29  # Wilson interval of 3/3
    assert client.get("/api/abtest", params={"sheet": "../x"}).status_code == 400


def test_a_job_runs_detached_and_records_its_exit_code(client, runs, tmp_path):
    from tuneforge.ui import jobs

    config = tmp_path / "data" / "c.yaml"
    config.write_text("run_name: c\nmodel: {name_or_path: x}\nmethod: {name: lora}\ndata: {train: [a.jsonl]}\n")
    job = jobs.start_job(runs, "report", ["validate", str(config)], title="validate")
    deadline = time.time() + 60
    while time.time() < deadline:
        record = client.get("/api/job", params={"id": job["id"]}).json()
        if record["returncode"] is not None:
            break
        time.sleep(0.3)
    assert record["returncode"] == 0 and record["state"] == "finished"
    assert "c.yaml: ok" in record["log_tail"] and record["child_pid"]
    listed = client.get("/api/jobs").json()["jobs"]
    assert listed[0]["id"] == job["id"]


def test_a_resumed_run_shows_live_progress_not_its_old_summary(client, runs):
    run = write_run(runs, "again", summary={"status": "interrupted", "global_step": 2, "last_logged_loss": 1.5},
                    checkpoint=True, steps=6)
    lock = open(runs / ".again.lock", "w")  # noqa: SIM115 - the resumed trainer holds it
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        row = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}["again"]
    finally:
        lock.close()
    assert row["status"] == "running" and row["step"] == 6 and row["last_loss"] == pytest.approx(0.5)
    assert run.is_dir()


def test_stop_sends_sigterm_to_the_process_holding_the_run_lock(client, runs, tmp_path):
    import subprocess
    import sys

    write_run(runs, "busy", steps=2)
    marker = tmp_path / "got-sigterm"
    holder = (
        "import fcntl, os, signal, sys, time\n"
        f"f = open({str(runs / '.busy.lock')!r}, 'w'); f.write(str(os.getpid())); f.flush()\n"
        "fcntl.flock(f.fileno(), fcntl.LOCK_EX)\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').close(), sys.exit(75)))\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        row = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}["busy"]
        assert row["status"] == "running" and row["pid"] == proc.pid
        response = client.post("/api/run/stop", json={"id": "busy"})
        assert response.status_code == 200 and response.json()["stopped"] == proc.pid
        assert proc.wait(20) == 75 and marker.exists()
    finally:
        proc.kill()
        proc.wait()
    assert client.post("/api/run/stop", json={"id": "busy"}).status_code == 400  # nothing trains into it now


def test_per_task_parents_and_search_studies_are_listed_with_their_runs(client, runs):
    parent = write_run(runs, "multi", summary={"status": "completed"}, final=True)
    write_run(parent / "tasks", "qa", summary={"status": "completed"}, final=True)
    study = runs / "lr-study"
    study.mkdir()
    (study / "study.db").write_bytes(b"")
    (study / "search.html").write_text("<html>plots</html>")
    write_run(study, "trial-0", summary={"status": "completed", "best_eval_loss": 2.0}, final=True)
    write_run(study, "trial-1", summary={"status": "completed", "best_eval_loss": 1.5}, final=True)
    rows = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
    assert rows["multi"]["kind"] == "per-task" and rows["multi"]["children"] == ["multi/tasks/qa"]
    assert rows["multi/tasks/qa"]["kind"] == "task"
    assert rows["lr-study"]["kind"] == "study" and rows["lr-study/trial-0"]["kind"] == "trial"
    studies = client.get("/api/studies").json()["studies"]
    assert studies[0]["best"] == "lr-study/trial-1" and len(studies[0]["trials"]) == 2
    assert "search.html" in studies[0]["files"]
    assert "plots" in client.get("/study/file", params={"id": "lr-study", "name": "search.html"}).text
    assert client.get("/study/file", params={"id": "lr-study", "name": "study.db"}).status_code == 400


@pytest.mark.slow  # a real `tuneforge train` process (imports torch, then fails on the missing model)
def test_start_lists_the_run_while_it_starts_and_a_failed_start_keeps_its_job_log(client, runs, tmp_path):
    data = tmp_path / "data"
    body = {"values": {"run_name": "nomodel", "model.name_or_path": str(data / "no-such-model"),
                       "data.train": str(data / "train.jsonl"), "train.max_steps": "2"},
            "widgets": {"data.train": "list"}}
    started = client.post("/api/start", json=body)
    assert started.status_code == 200, started.text
    job = started.json()["job"]
    assert job["command"].startswith("tuneforge train ") and Path(job["argv"][-1]).is_file()
    rows = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
    assert rows["nomodel"]["status"] in ("starting", "running") and rows["nomodel"]["job"] == job["id"]
    deadline = time.time() + 120
    while time.time() < deadline and client.get("/api/job", params={"id": job["id"]}).json()["returncode"] is None:
        time.sleep(0.5)
    record = client.get("/api/job", params={"id": job["id"]}).json()
    assert record["returncode"] == 2 and "no-such-model" in record["log_tail"]  # the CLI's UserError, exit 2
    rows = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
    assert rows["nomodel"]["status"] == "failed"


def test_concurrent_votes_are_all_kept(client, runs):
    from concurrent.futures import ThreadPoolExecutor

    from tuneforge.evaluate.abtest import make_items, write_sheet

    folder = runs / ".tuneforge-ui" / "abtest" / "s2"
    folder.mkdir(parents=True)
    n = 12
    items = make_items([f"q{i}" for i in range(n)], ["a"] * n, ["b"] * n, seed=1)
    write_sheet(folder / "sheet.html", items, "A", "B", seed=1, generation={})
    ids = [it["id"] for it in client.get("/api/abtest", params={"sheet": "s2"}).json()["items"]]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.post("/api/abtest/vote", json={"sheet": "s2", "item": i, "vote": "tie"}), ids))
    assert client.get("/api/abtest/score", params={"sheet": "s2"}).json()["votes"] == n
