"""`tuneforge ui` end to end in a real browser: Playwright driving Debian's Chromium (no browser download).

Covers: runs listed and sortable; a live run's curve growing without a reload; a run started from the new-run form
appearing and finishing; chat answering side by side (run and its base, through `tuneforge serve`); runs evaluated
on a data file from Compare (saved to the run like `tuneforge eval`); blind A/B votes scored; an export finishing
with its parity figures. Screenshots are written to ``$TUNEFORGE_UI_SCREENSHOTS`` (the
README's come from there) or to a pytest temporary directory, printed at the end.

Skips with the reason when chromium or playwright is missing (scripts/setup.sh installs both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import write_chat_items

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed (scripts/setup.sh installs it with apt-get when run as root)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("uvicorn")

TIMEOUT_MS = 240_000  # a from-scratch run, a serve start or an export on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("TUNEFORGE_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    print(f"\nui screenshots: {folder}")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A UI server over a fresh runs directory (in a thread), with a data root holding chat records."""
    import uvicorn

    from tuneforge.ui.app import create_app

    root = tmp_path_factory.mktemp("ui")
    runs, data = root / "runs", root / "data"
    runs.mkdir()
    data.mkdir()
    write_chat_items(data, 64, seed=1, name="train.jsonl")
    write_chat_items(data, 4, seed=2, name="prompts.jsonl")
    port = _free_port()
    app = create_app(runs, data_roots=[data])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "runs": runs, "data": data}
    server.should_exit = True
    thread.join(15)
    app.state.pool.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(30_000)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def write_fake_run(runs: Path, name: str, steps: int, status: str | None = "completed", loss0: float = 4.0) -> Path:
    run = runs / name
    run.mkdir()
    config = {"run_name": name, "stage": "sft", "model": {"name_or_path": "org/base"}, "method": {"name": "lora"},
              "data": {"train": ["x.jsonl"]}, "train": {"max_steps": 50}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "tuneforge_run.json").write_text(json.dumps({"tuneforge_run": 1}))
    append_metrics(run, range(1, steps + 1), loss0)
    if status:
        (run / "summary.json").write_text(json.dumps({"status": status, "global_step": steps}))
    return run


def append_metrics(run: Path, steps, loss0: float = 4.0) -> None:
    with open(run / "metrics.jsonl", "a") as handle:
        for step in steps:
            handle.write(json.dumps({"event": "log", "step": step, "loss": loss0 / (1 + 0.1 * step),
                                     "lr": 1e-3 * (1 - step / 60), "grad_norm": 1.0 + 0.01 * step}) + "\n")


def test_runs_are_listed_and_sortable(ui, page, shots):
    write_fake_run(ui["runs"], "alpha", 12, loss0=2.0)
    write_fake_run(ui["runs"], "beta", 5, status="interrupted", loss0=9.0)
    page.goto(ui["url"] + "/")
    rows = page.locator("#runs tbody tr")
    sync_api.expect(rows.filter(has_text="alpha")).to_have_count(1)
    sync_api.expect(rows.filter(has_text="beta")).to_contain_text("interrupted")
    sync_api.expect(rows.filter(has_text="alpha")).to_contain_text("finished")
    page.get_by_role("button", name="Last loss").click()  # ascending by last loss: alpha's is smaller
    sync_api.expect(rows.first).to_have_attribute("data-run", "alpha")
    page.get_by_role("button", name="Last loss").click()
    sync_api.expect(rows.first).to_have_attribute("data-run", "beta")
    page.screenshot(path=shots / "ui-runs.png")


def test_live_curve_grows_without_a_reload(ui, page, shots):
    run = write_fake_run(ui["runs"], "live", 4, status=None)
    page.goto(ui["url"] + "/run?id=live")
    loss = page.locator('[data-chart="loss"]')
    sync_api.expect(loss).to_have_attribute("data-points", "4")
    page.evaluate("window.__marker = 'same page'")
    append_metrics(run, range(5, 21))
    sync_api.expect(loss).to_have_attribute("data-points", "20", timeout=15_000)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"event": "warning", "step": 20, "kind": "loss_spike", "message": "loss jumped 3x",
                                 "advice": "lower train.lr"}) + "\n")
    sync_api.expect(page.locator("#warnings")).to_contain_text("lower train.lr", timeout=15_000)
    assert page.evaluate("window.__marker") == "same page"  # no reload happened
    page.screenshot(path=shots / "ui-run-live.png", full_page=True)


@pytest.fixture(scope="module")
def form_run(ui, browser, shots):
    """A tiny from_config LoRA run started from the new-run form; the run's id once it has finished."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.goto(ui["url"] + "/new")
    page.get_by_label("Build from architecture numbers (model.from_config)").check()
    page.get_by_label("Run name (run_name)").fill("tiny")
    page.get_by_label("Hidden size (model.from_config.hidden_size)").fill("64")
    page.get_by_label("Layers (model.from_config.num_layers)").fill("2")
    page.get_by_label("Vocabulary size (model.from_config.vocab_size)").fill("512")
    page.get_by_label("Training data files (data.train)").fill(str(ui["data"] / "train.jsonl"))
    page.get_by_label("Max length (tokens) (data.max_length)").fill("128")
    page.get_by_label("Max steps (train.max_steps)").fill("12")
    page.get_by_label("Rank (method.r)").fill("4")
    page.get_by_label("Logging steps (train.logging_steps)").fill("2")
    page.get_by_label("Report to (train.report_to)").fill("none")
    # a bad value is reported as you type, naming the key, with validate's message
    page.get_by_label("Learning rate (train.lr)").fill("-1")
    sync_api.expect(page.locator("#errors")).to_contain_text("train.lr: Input should be greater than 0")
    sync_api.expect(page.locator('.field[data-key="train.lr"] .err')).to_contain_text("train.lr")
    sync_api.expect(page.get_by_role("button", name="Start training")).to_be_disabled()
    page.get_by_label("Learning rate (train.lr)").fill("1e-3")
    sync_api.expect(page.locator("#errors")).to_contain_text("valid")
    sync_api.expect(page.locator("#yaml")).to_contain_text("lr: 0.001")
    page.get_by_role("button", name="Preview data").click()
    sync_api.expect(page.locator("#preview mark").first).to_be_visible(timeout=120_000)
    page.screenshot(path=shots / "ui-new-run.png")
    page.get_by_role("button", name="Start training").click()
    sync_api.expect(page.locator("#start-result")).to_contain_text("tiny")
    page.goto(ui["url"] + "/")
    row = page.locator('#runs tbody tr[data-run="tiny"]')
    sync_api.expect(row).to_have_count(1, timeout=30_000)  # listed while it starts
    sync_api.expect(row).to_have_attribute("data-status", "finished", timeout=TIMEOUT_MS)
    page.goto(ui["url"] + "/run?id=tiny")
    loss = page.locator('[data-chart="loss"]')
    sync_api.expect(loss).to_have_attribute("data-points", re.compile(r"^([6-9]|\d\d)$"))  # 12 steps, every 2nd
    page.screenshot(path=shots / "ui-run-finished.png", full_page=True)
    context.close()
    return "tiny"


def test_run_started_from_the_form_finishes(form_run, ui):
    run = ui["runs"] / form_run
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert (run / "final").is_dir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 12 and config["train"]["lr"] == 1e-3


def test_chat_answers_side_by_side(form_run, ui, page, shots):
    page.goto(ui["url"] + f"/chat?a=run:{form_run}&b=base:{form_run}")
    sync_api.expect(page.locator("#pane-b")).to_be_visible()
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Message").fill("Which kind of Python documentation is this sentence from?")
    page.get_by_role("button", name="Send").click()
    streamed = {}
    for side in ("a", "b"):
        answer = page.locator(f"#log-{side} .msg[data-role=assistant]")
        sync_api.expect(answer).to_have_attribute("data-done", "1", timeout=TIMEOUT_MS)
        sync_api.expect(answer).not_to_have_class("msg error")
        streamed[side] = int(answer.get_attribute("data-chars"))
    # the random base never learned to stop: it streams up to max tokens (the 12-step run may end its turn at once)
    assert streamed["b"] > 0
    page.screenshot(path=shots / "ui-chat.png")


def test_compare_evaluates_runs_and_saves_like_tuneforge_eval(form_run, ui, page, shots):
    page.goto(ui["url"] + "/compare")
    page.get_by_label(f"{form_run} (tuned)").check()
    page.get_by_label("Data file").fill(str(ui["data"] / "prompts.jsonl"))
    page.get_by_label("Metrics").fill("ppl")
    page.get_by_role("button", name="Evaluate").click()
    results = page.get_by_role("table", name="Eval results")
    sync_api.expect(results).to_be_visible(timeout=TIMEOUT_MS)
    sync_api.expect(results.locator("th", has_text="ppl")).to_have_count(1)
    saved = json.loads((ui["runs"] / form_run / "eval_results.json").read_text())
    assert saved[-1]["ppl"] > 1 and saved[-1]["data"].endswith("prompts.jsonl")  # appended like `tuneforge eval`
    page.goto(ui["url"] + f"/run?id={form_run}")
    sync_api.expect(page.locator("#evals")).to_contain_text("prompts.jsonl")
    page.screenshot(path=shots / "ui-compare-eval.png", full_page=True)


def test_blind_ab_votes_are_scored(form_run, ui, page, shots):
    page.goto(ui["url"] + "/compare")
    page.get_by_label("Model A").select_option(f"run:{form_run}")
    page.get_by_label("Model B").select_option(f"base:{form_run}")
    page.get_by_label("Prompts file").fill(str(ui["data"] / "prompts.jsonl"))
    page.get_by_label("Prompts to compare").fill("3")
    page.get_by_label("Max new tokens").fill("8")
    page.get_by_role("button", name="Make sheet").click()
    items = page.locator("#ab-items .ab-item")
    sync_api.expect(items).to_have_count(3, timeout=TIMEOUT_MS)
    for i, vote in enumerate(("Left is better", "Right is better", "Tie")):
        item = items.nth(i)
        item.get_by_role("button", name=vote).click()
        sync_api.expect(item).to_have_attribute("data-voted", ("left", "right", "tie")[i])
    page.get_by_role("button", name="Score votes").click()
    score = page.locator("#ab-score")
    sync_api.expect(score).to_contain_text("3 votes")
    sync_api.expect(score).to_contain_text("95% Wilson interval")
    sync_api.expect(score.locator("td", has_text="ties")).to_have_count(1)
    page.screenshot(path=shots / "ui-abtest.png", full_page=True)


def test_export_finishes_with_parity_figures(form_run, ui, page, shots):
    page.goto(ui["url"] + f"/export?id={form_run}")
    page.get_by_label("Quantize").select_option("hf:int8")
    page.get_by_label("Output name (under runs)").fill(f"{form_run}-int8")
    page.get_by_role("button", name="Start", exact=True).click()
    state = page.locator("#ex-job .job-state")
    sync_api.expect(state).to_contain_text("finished", timeout=TIMEOUT_MS)
    sync_api.expect(page.get_by_role("table", name="Parity figures")).to_be_visible()
    assert (ui["runs"] / f"{form_run}-int8" / "export_report.json").is_file()
    page.screenshot(path=shots / "ui-export.png", full_page=True)
