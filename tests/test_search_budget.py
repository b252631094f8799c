"""The study-wide trial budget and the recovery of interrupted trials, on an in-memory Optuna study (no training)."""

from __future__ import annotations

import socket
import subprocess

import optuna
import pytest
from optuna.trial import TrialState

from tuneforge.search.study import (
    DISCARDED,
    RETRY_OF,
    WORKER,
    counted,
    recover_dead_local_trials,
    redact,
    requeue,
    worker_id,
)


@pytest.fixture()
def study():
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.create_study()


def _complete(study) -> None:
    trial = study.ask()
    trial.suggest_float("train.lr", 1e-5, 1e-2, log=True)
    study.tell(trial, 1.0)


def test_superseded_and_discarded_trials_do_not_count(study):
    _complete(study)                                     # 0
    interrupted = study.ask()                                  # 1: interrupted, queued again as 2
    interrupted.suggest_float("train.lr", 1e-5, 1e-2, log=True)
    study.tell(interrupted, state=TrialState.FAIL)
    requeue(study, study.trials[1], "interrupted")
    late = study.ask()                                         # pops 2 (the queued retry) first
    assert late.number == 2 and late.user_attrs[RETRY_OF] == 1
    assert late.suggest_float("train.lr", 1e-5, 1e-2, log=True) == interrupted.params["train.lr"]  # same values
    extra = study.ask()                                        # 3: numbered past the budget, discarded
    extra.set_user_attr(DISCARDED, "budget full")
    study.tell(extra, state=TrialState.FAIL)
    failed = study.ask()                                       # 4: an ordinary failure still counts
    study.tell(failed, state=TrialState.FAIL)
    numbers = [t.number for t in counted(study.trials, include_waiting=False)]
    assert numbers == [0, 2, 4]


def test_waiting_retries_count_for_positions_but_not_for_stopping(study):
    _complete(study)
    trial = study.ask()
    trial.suggest_float("train.lr", 1e-5, 1e-2, log=True)
    study.tell(trial, state=TrialState.FAIL)
    requeue(study, study.trials[1], "interrupted")  # 2, waiting
    assert [t.number for t in counted(study.trials, include_waiting=False)] == [0]
    assert [t.number for t in counted(study.trials, include_waiting=True)] == [0, 2]


def test_resume_recovers_only_trials_whose_local_worker_is_gone(study):
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = study.ask()
    dead.suggest_float("train.lr", 1e-5, 1e-2, log=True)
    dead.set_user_attr(WORKER, f"{socket.gethostname()}:{gone.pid}:1")
    alive = study.ask()
    alive.suggest_float("train.lr", 1e-5, 1e-2, log=True)
    alive.set_user_attr(WORKER, worker_id())  # this very process
    remote = study.ask()
    remote.suggest_float("train.lr", 1e-5, 1e-2, log=True)
    remote.set_user_attr(WORKER, "another-host:1:1")  # only its heartbeat can tell
    assert recover_dead_local_trials(study) == [0]
    trials = study.trials
    assert [t.state for t in trials[:3]] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]
    retry = trials[3]
    assert retry.state == TrialState.WAITING and retry.user_attrs[RETRY_OF] == 0
    assert "interrupted" in retry.user_attrs["retry_reason"]
    assert recover_dead_local_trials(study) == []  # once only


def test_passwords_never_reach_messages():
    assert redact("postgresql://me:secret@db:5432/optuna") == "postgresql://me:***@db:5432/optuna"
    assert redact("postgresql://me@db/optuna") == "postgresql://me@db/optuna"
    assert redact("sqlite:////tmp/x/study.db") == "sqlite:////tmp/x/study.db"
