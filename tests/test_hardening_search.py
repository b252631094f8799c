"""Issue 22 (hardening) for ``tuneforge search``: a signal stops the worker and re-queues its trial, progress and the
leaderboard are plain text, storage secrets are never printed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.helpers_search import write_data, write_run, write_space
from tuneforge.cli import main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("search-data"))


def _trials(study_dir: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{(study_dir / 'study.db').resolve()}").trials


@pytest.fixture()
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt in this process as in a terminal, even in a suite started in the background
    (`cmd &` in a script ignores SIGINT, and Python then installs no handler for it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_a_trial_requeues_it_and_stops_the_worker(tmp_path, data_dir, monkeypatch, capsys,
                                                                  ctrl_c_raises, signum, code):
    """SIGTERM during training used to fail the trial (counted against the budget: the run's own handler turned it
    into a TrainingInterrupted error) and the worker went on with the next trial."""
    from tuneforge.search.callback import TrialCallback

    sent = []
    on_step_end = TrialCallback.on_step_end

    def signal_once(self, args, state, control, **kwargs):
        if not sent and state.global_step == 1:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return on_step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(TrialCallback, "on_step_end", signal_once)
    run = write_run(tmp_path, data_dir, max_steps=4, eval_steps=2)
    space = write_space(tmp_path, {"train.lr": {"choice": [1e-3, 3e-3]}})
    args = [str(run), "--space", str(space), "--sampler", "grid", "--pruner", "none", "--study", "s"]
    assert main(["search", *args]) == code
    assert "queued again" in capsys.readouterr().err and sent == [signum]
    study_dir = tmp_path / "runs" / "s"
    trials = _trials(study_dir, "s")
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]  # no second trial was started
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].system_attrs["fixed_params"] == trials[0].params
    assert not (study_dir / "trial-1").exists()
    # the interrupted trial does not count: --resume runs the retry and the other grid point, two trials in all
    assert main(["search", *args, "--resume"]) == 0
    trials = _trials(study_dir, "s")
    counted = [t for t in trials if t.number != 0]
    assert len(counted) == 2 and all(t.state.name == "COMPLETE" for t in counted)
    assert {t.params["train.lr"] for t in counted} == {1e-3, 3e-3}


def test_progress_and_leaderboard_are_plain_text(tmp_path, data_dir, capsys):
    """Rich markup used to eat list values and a '[/x]' in a failure reason ended the search with a MarkupError."""
    run = write_run(tmp_path, data_dir)
    space = write_space(tmp_path, {"model.chat_template": {"choice": ["[/x]"]},
                                   "method.target_modules": {"choice": [["q_proj", "v_proj"]]}})
    assert main(["search", str(run), "--space", str(space), "--sampler", "grid", "--pruner", "none",
                 "--study", "m"]) == 0
    out = capsys.readouterr().out
    assert "trial 0: method.target_modules=[q_proj, v_proj], model.chat_template='[/x]'" in out
    assert "unknown template '[/x]'" in out
    assert "'[/x" in out.split("leaderboard")[1] and "study 'm': 1 failed" in out


def test_storage_secrets_are_redacted_in_every_form():
    from tuneforge.search.study import redact

    assert redact("postgresql://me:secret@db:5432/optuna") == "postgresql://me:***@db:5432/optuna"
    assert redact("postgresql://me@db/optuna") == "postgresql://me@db/optuna"
    assert redact("sqlite:////tmp/x/study.db") == "sqlite:////tmp/x/study.db"
    assert redact("postgresql://u@h/db?password=pw1&sslmode=require") == "postgresql://u@h/db?password=***&sslmode=require"
    assert redact("postgresql://u:p@ss@h/db?sslpassword=pw2") == "postgresql://u:***@h/db?sslpassword=***"
    assert redact("Could not parse URL from string 'mysql://u:pw3@h:x/db'") == "Could not parse URL from string 'mysql://u:***@h:x/db'"
    assert redact("host=h password=pw4 dbname=d") == "host=h password=*** dbname=d"


@pytest.mark.parametrize("url", ["postgresql://u:hunter2@127.0.0.1:1/db?password=hunter3",
                                 "postgresql://u@127.0.0.1:1/db?password=hunter3",
                                 "postgresql://u:hunter2@host:notaport/db"])
def test_no_storage_secret_reaches_the_terminal(tmp_path, data_dir, capsys, url):
    run = write_run(tmp_path, data_dir)
    space = write_space(tmp_path, {"train.lr": {"choice": [1e-3, 3e-3]}})
    assert main(["search", str(run), "--space", str(space), "--trials", "2", "--storage", url]) == 2
    printed = capsys.readouterr()
    assert "cannot open the study storage" in printed.err
    assert "hunter" not in printed.out + printed.err


def test_the_storage_url_may_come_from_an_environment_variable(tmp_path, data_dir, monkeypatch, capsys):
    from tuneforge.search.study import SearchOptions, prepare

    run = write_run(tmp_path, data_dir)
    space = write_space(tmp_path, {"train.lr": {"choice": [1e-3, 3e-3]}})
    url = f"sqlite:///{tmp_path / 'shared.db'}?password=hunter4"
    monkeypatch.setenv("STUDY_DB", url)
    search = prepare(SearchOptions(config=str(run), space=str(space), sampler="grid", storage="env:STUDY_DB"))
    assert search.storage_url == url and "hunter" not in repr(search)
    assert main(["search", str(run), "--space", str(space), "--sampler", "grid", "--storage", "env:NO_SUCH_VAR"]) == 2
    assert "NO_SUCH_VAR is not set" in capsys.readouterr().err
