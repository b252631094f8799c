"""Issue 22 (hardening): nothing a user made is replaced, secrets stay where they were sent, an interrupted command
stops promptly. One test (or a few) per item; each failed on the code before its fix."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuneforge.cli import main
from tuneforge.errors import UserError

# --------------------------------------------------------------------------- data: strip_html


def test_strip_html_cuts_blocks_at_their_offsets_in_the_original_text():
    from tuneforge.data.clean import strip_html

    # 'İ'.lower() is two characters: offsets of text.lower() used on text cut three characters too far
    assert strip_html("İİİ<script>x</script>keep me") == "İİİkeep me"
    assert strip_html("İ<STYLE>p {}</Style >after<!-- c -->end") == "İafterend"
    assert strip_html("ok<script>never closed") == "ok"


# --------------------------------------------------------------------------- data: the HTTP teacher


class _Recorder:
    """A local HTTP server that records every request (method, path, headers) and answers with ``answer(handler)``."""

    def __init__(self, host: str, answer) -> None:
        self.seen: list[tuple[str, str, dict]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                recorder.seen.append((self.command, self.path, dict(self.headers)))
                answer(self)

            do_GET = do_POST = _any  # noqa: N815 - http.server's names

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _send(handler, status: int, body: bytes = b"", headers: dict | None = None) -> None:
    handler.send_response(status)
    for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


def _completion(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
                      ).encode()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_teacher_behind_a_redirect_to_another_host_never_shows_it_the_key(status):
    from tuneforge.data.teacher import HttpTeacher

    other = _Recorder("127.0.0.2", lambda h: _send(h, 200, _completion("stolen")))
    first = _Recorder("127.0.0.1", lambda h: _send(
        h, status, headers={"Location": f"{other.url}/v1/chat/completions"}))
    try:
        teacher = HttpTeacher(f"{first.url}/v1", api_key="sk-secret-key", retries=0)
        with pytest.raises(UserError, match=r"redirects to http://127\.0\.0\.2.*give the URL it redirects to"):
            teacher.probe()
        from tuneforge.data.augment import TeacherUnavailable

        with pytest.raises(TeacherUnavailable, match="redirect"):
            teacher.ask([{"role": "user", "content": "hi"}], 1, seed=0)
    finally:
        first.close()
        other.close()
    assert [(method, path) for method, path, _ in first.seen] == [("POST", "/v1/chat/completions")] * 2
    assert first.seen[0][2]["Authorization"] == "Bearer sk-secret-key"
    assert other.seen == []  # the other host saw nothing at all: no key, no GET


def test_a_key_over_plain_http_to_another_host_is_warned_about(capsys):
    from tuneforge.data.teacher import HttpTeacher

    HttpTeacher("http://teacher.example.com/v1", api_key="k")
    assert "unencrypted" in capsys.readouterr().err
    for url in ("https://teacher.example.com/v1", "http://127.0.0.1:8000/v1", "http://localhost:8000/v1",
                "http://[::1]:8000/v1"):
        HttpTeacher(url, api_key="k")
    HttpTeacher("http://teacher.example.com/v1")  # no key, nothing to leak
    assert "unencrypted" not in capsys.readouterr().err


def test_an_oversized_teacher_answer_fails_its_request_without_being_read_whole(monkeypatch):
    from tuneforge.data import teacher as teacher_module

    monkeypatch.setattr(teacher_module, "MAX_RESPONSE_BYTES", 1000)
    server = _Recorder("127.0.0.1", lambda h: _send(h, 200, _completion("x" * 5000)))
    try:
        (reply,) = teacher_module.HttpTeacher(f"{server.url}/v1", retries=0).ask(
            [{"role": "user", "content": "hi"}], 1, seed=0)
    finally:
        server.close()
    assert reply.text is None and "larger than" in reply.error


# --------------------------------------------------------------------------- data: augment's Ctrl-C


def test_ctrl_c_stops_augment_within_seconds_while_teacher_requests_hang(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    release = threading.Event()

    def answer(handler):
        if handler.path.endswith("/chat/completions") and len(server.seen) > 1:
            release.wait(60)  # a teacher that takes a minute per answer
        _send(handler, 200, _completion("INSTRUCTION: Something else entirely.\nANSWER: Yes."))

    server = _Recorder("127.0.0.1", answer)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"Question number {i}?", "output": "Yes."}) + "\n"
                           for i in range(8)))
    worker = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli", "data", "augment", str(src), "--out", str(tmp_path / "out.jsonl"),
         "--teacher", f"{server.url}/v1", "--mode", "rewrite", "--n", "1", "--no-progress", "--concurrency", "4"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C's default action in the child, whatever the suite inherited: a suite started in the background
        # (`cmd &` in a script) ignores SIGINT, children inherit that, and Python then installs no handler for it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while len(server.seen) < 5:  # the probe, then four requests in flight
            assert worker.poll() is None, worker.communicate()
            assert time.time() < deadline, "the requests never arrived"
            time.sleep(0.05)
        os.kill(worker.pid, signal.SIGINT)
        interrupted = time.time()
        worker.wait(timeout=60)
        took = time.time() - interrupted
    finally:
        if worker.poll() is None:
            worker.kill()
        release.set()
        server.close()
    assert worker.returncode == 130 and took < 5, (worker.returncode, took)


# --------------------------------------------------------------------------- evaluate: eval_results.json


class _Settings:
    def to_dict(self):
        return {"temperature": 0.0}


def test_concurrent_evaluations_of_one_run_all_keep_their_result(tmp_path, monkeypatch):
    import time

    from tuneforge import utils
    from tuneforge.evaluate.runner import append_eval_result

    slow_write = utils.atomic_write_json

    def widened(path, data):  # read-modify-write takes a while: without a lock, writers overwrite each other
        time.sleep(0.01)
        slow_write(path, data)

    monkeypatch.setattr(utils, "atomic_write_json", widened)

    def evaluate(worker: int) -> None:
        for i in range(5):
            append_eval_result(tmp_path, {"model": f"w{worker}-{i}"}, "data.jsonl", [], _Settings())

    threads = [threading.Thread(target=evaluate, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert sorted(e["model"] for e in saved) == sorted(f"w{w}-{i}" for w in range(6) for i in range(5))


@pytest.mark.parametrize("text", ["[{\"model\": \"a\"}, {\"mod", "{\"model\": \"a\"}"])
def test_a_corrupt_eval_results_file_is_reported_and_kept(tmp_path, text, capsys):
    from tuneforge.evaluate.runner import append_eval_result

    results = tmp_path / "eval_results.json"
    results.write_text(text)
    with pytest.raises(UserError, match=r"eval_results\.json .*(not valid JSON|not the list).*move it aside"):
        append_eval_result(tmp_path, {"model": "b"}, "data.jsonl", [], _Settings())
    assert results.read_text() == text
    # tuneforge eval says so before loading any model (the run here is not even a loadable one)
    assert main(["eval", str(tmp_path), "--data", str(results)]) == 2
    assert "eval_results.json" in capsys.readouterr().err and results.read_text() == text


# --------------------------------------------------------------------------- evaluate: abtest keeps earlier sheets


def test_abtest_never_replaces_an_earlier_sheet_or_key_without_force(tmp_path, monkeypatch, capsys):
    from tuneforge.evaluate import abtest

    items = abtest.make_items(["q1", "q2"], ["a1", "a2"], ["b1", "b2"], seed=1)
    sheet, key = abtest.write_sheet(tmp_path / "sheet.html", items, "a", "b", 1, {})
    before = {p: p.read_bytes() for p in (sheet, key)}
    with pytest.raises(UserError, match="already exist.*--force"):
        abtest.write_sheet(sheet, items, "c", "d", 2, {})
    assert {p: p.read_bytes() for p in (sheet, key)} == before
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "hello"}) + "\n")
    # the CLI refuses before loading any model (the models named here do not even exist), at --out ...
    assert main(["abtest", "no_model_a", "no_model_b", "--prompts", str(prompts), "--out", str(sheet)]) == 2
    assert "--force" in capsys.readouterr().err
    # ... at the default path (abtest.html / abtest.key.json in the working directory) ...
    monkeypatch.chdir(tmp_path)
    (tmp_path / "abtest.key.json").write_text("{}")
    assert main(["abtest", "no_model_a", "no_model_b", "--prompts", str(prompts)]) == 2
    assert "abtest.key.json already exists" in capsys.readouterr().err
    # ... and in terminal mode (its key and votes)
    assert main(["abtest", "no_model_a", "no_model_b", "--prompts", str(prompts), "--terminal"]) == 2
    assert "abtest.key.json already exists" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (sheet, key)} == before and (tmp_path / "abtest.key.json").read_text() == "{}"
    replaced = abtest.write_sheet(sheet, items, "c", "d", 2, {}, force=True)
    assert replaced == (sheet, key) and key.read_bytes() != before[key]
