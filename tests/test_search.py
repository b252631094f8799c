"""``tuneforge search`` end to end on tiny from-config models: grid coverage, failed trials, pruning, the memory
gate, bad input, and a killed search resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import pytest
import yaml

from tests.helpers_search import write_data, write_run, write_space
from tuneforge.cli import main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("search-data"))


def load_study(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url)


def sqlite_url(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / 'study.db').resolve()}"


def test_grid_runs_every_combination_once_records_failures_and_writes_results(tmp_path, data_dir, capsys):
    from tuneforge.config import load_config

    run = write_run(tmp_path, data_dir)
    space = write_space(tmp_path, {
        "model.from_config.num_heads": {"choice": [4, 3]},  # 3 heads cannot split width 32: a failed trial
        "method.r": {"choice": [2, 4]},
        "method.alpha": {"tie": "2 * method.r"},
        "method.dropout": {"tie": "0.0 if train.lr > 1.0e-3 else 0.1"},  # reads the run config's lr
    })
    assert main(["search", str(run), "--space", str(space), "--sampler", "grid", "--pruner", "none", "--study", "g"]) == 0
    study_dir = tmp_path / "runs" / "g"
    study = load_study(sqlite_url(study_dir), "g")
    trials = study.trials
    assert len(trials) == 4
    combos = {(t.params["model.from_config.num_heads"], t.params["method.r"]) for t in trials}
    assert combos == set(product([4, 3], [2, 4]))

    failed = [t for t in trials if t.state.name == "FAIL"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert {t.params["model.from_config.num_heads"] for t in failed} == {3} and len(failed) == 2
    assert all("divisible" in t.user_attrs["fail_reason"] for t in failed)
    assert len(complete) == 2
    for t in complete:  # each trial is an ordinary run directory with the sampled and tied values
        cfg = yaml.safe_load((study_dir / f"trial-{t.number}" / "config.yaml").read_text())
        assert cfg["method"]["r"] == t.params["method.r"] and cfg["model"]["from_config"]["num_heads"] == 4
        assert cfg["method"]["alpha"] == 2 * t.params["method.r"] == t.user_attrs["ties"]["method.alpha"]
        assert cfg["method"]["dropout"] == 0.0
        assert json.loads((study_dir / f"trial-{t.number}" / "summary.json").read_text())["global_step"] == 4
        assert t.value == pytest.approx(t.user_attrs["eval_loss"])

    best = min(complete, key=lambda t: t.value)
    best_cfg = load_config(study_dir / "best.yaml")  # runnable: a valid config of its own run
    assert best_cfg.method.r == best.params["method.r"] and best_cfg.method.alpha == 2 * best.params["method.r"]
    assert best_cfg.output_dir != str(study_dir / f"trial-{best.number}")
    page = (study_dir / "search.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "<script" not in page
    out = capsys.readouterr().out
    assert "leaderboard" in out and "2 complete, 2 failed" in out


def test_a_pruned_trial_stops_early(tmp_path, data_dir):
    import optuna

    from tuneforge.console import silenced
    from tuneforge.search.study import SearchOptions, open_storage, open_study, prepare, run_search

    run = write_run(tmp_path, data_dir, max_steps=8, eval_steps=2)
    space = write_space(tmp_path, {"train.lr": {"choice": [3e-3, 1e-3]}})
    options = SearchOptions(config=str(run), space=str(space), trials=2, sampler="random", pruner="median",
                            pruner_startup=1, study="p")
    search = prepare(options)
    study, _ = open_study(search, open_storage(search.storage_url))
    # An earlier trial that reached a far lower eval loss at every step: the next one is pruned at its first eval.
    study.add_trial(optuna.trial.create_trial(
        params={"train.lr": 3e-3}, distributions={"train.lr": optuna.distributions.CategoricalDistribution([3e-3, 1e-3])},
        value=0.01, intermediate_values={2: 0.01, 4: 0.01, 6: 0.01, 8: 0.01}))
    search.options.resume = True
    with silenced():
        result = run_search(search)
    assert result.ran == [1]
    trial = load_study(search.storage_url, "p").trials[1]
    assert trial.state.name == "PRUNED" and trial.user_attrs["prune_reason"].startswith("pruned at step 2")
    run_dir = Path(trial.user_attrs["run_dir"])
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2 < 8
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 2 == trial.user_attrs["steps"]


def test_combinations_that_cannot_fit_the_gpu_are_pruned_before_they_start(tmp_path, data_dir):
    run = write_run(tmp_path, data_dir, eval_steps=None)  # no intermediate evals: the last step is still scored
    space = write_space(tmp_path, {"model.from_config.hidden_size": {"choice": [32, 8192]}})
    assert main(["search", str(run), "--space", str(space), "--sampler", "grid", "--gpu-mem", "1", "--study", "m",
                 "--pruner", "none"]) == 0
    study_dir = tmp_path / "runs" / "m"
    by_width = {t.params["model.from_config.hidden_size"]: t for t in load_study(sqlite_url(study_dir), "m").trials}
    big, small = by_width[8192], by_width[32]
    assert big.state.name == "PRUNED" and "not started" in big.user_attrs["prune_reason"]
    assert big.user_attrs["estimated_gib"] > 0.9 and not (study_dir / f"trial-{big.number}").exists()
    assert small.state.name == "COMPLETE" and small.user_attrs["estimated_gib"] < 0.9
    assert small.value == pytest.approx(small.user_attrs["eval_loss"]) and small.user_attrs["steps"] == 4


@pytest.mark.parametrize(("space", "args", "message"), [
    ({"train.learning_rate": {"choice": [1e-3]}}, [], "did you mean 'train.lr'"),
    ({"method.r": {"choice": []}}, [], "choice needs a non-empty list"),
    ({"train.lr": {"uniform": [1e-3, 1e-4]}}, [], "low (0.001) must be below high"),
    ({"train.lr": {"log_uniform": [0.0, 1e-3]}}, [], "a log range needs low > 0"),
    ({"train.lr": {"choice": [1e-3, 3e-3]}}, ["--objective", "accuracy"], "is not reported by a run"),
    ({"train.lr": {"choice": [1e-3, 3e-3]}}, ["--storage", "postgresql://nobody@127.0.0.1:1/none"],
     "cannot open the study storage"),
    ({"train.lr": {"choice": [1e-3, 3e-3]}}, ["--storage", "nosuchdb://x"], "--storage nosuchdb://x"),
    ({"train.lr": {"log_uniform": [1e-4, 1e-3]}}, ["--sampler", "grid"], "is a range"),
    ({"train.lr": {"log_uniform": [1e-4, 1e-3]}}, ["--sampler", "random"], "needs --trials"),
    ({"train.lr": {"choice": [1e-3, 3e-3]}}, ["--pruner", "median", "--eval-steps-off"], "train.eval_steps"),
    ({"train.lr": {"choice": [1e-3, 3e-3]}}, ["--no-eval-data"], "held-out data"),
])
def test_bad_input_exits_2_before_any_trial(tmp_path, data_dir, capsys, space, args, message):
    eval_steps = None if "--eval-steps-off" in args else 2
    run = write_run(tmp_path, data_dir, eval_steps=eval_steps)
    if "--no-eval-data" in args:
        raw = yaml.safe_load(run.read_text())
        del raw["data"]["eval"]
        run.write_text(yaml.safe_dump(raw))
    args = [a for a in args if not a.startswith(("--eval-steps-off", "--no-eval-data"))]
    trials = [] if "--sampler" in args else ["--trials", "2"]  # the sampler cases are about the budget itself
    code = main(["search", str(run), "--space", str(write_space(tmp_path, space)), *trials, *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.rglob("trial-*"))


def test_an_existing_study_needs_resume(tmp_path, data_dir, capsys):
    from tuneforge.search.study import SearchOptions, open_storage, open_study, prepare

    run = write_run(tmp_path, data_dir)
    space = write_space(tmp_path, {"train.lr": {"choice": [1e-3, 3e-3]}})
    search = prepare(SearchOptions(config=str(run), space=str(space), sampler="grid", study="e"))
    open_study(search, open_storage(search.storage_url))
    assert main(["search", str(run), "--space", str(space), "--sampler", "grid", "--study", "e"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    other = write_space(tmp_path, {"train.lr": {"choice": [1e-3, 2e-3]}}, "other.yaml")
    assert main(["search", str(run), "--space", str(other), "--sampler", "grid", "--study", "e", "--resume"]) == 2
    assert "another run config, space" in capsys.readouterr().err
    assert not list(tmp_path.rglob("trial-*"))


@pytest.mark.slow
def test_a_killed_search_resumes_and_completes_the_remaining_trials(tmp_path, data_dir):
    run = write_run(tmp_path, data_dir, max_steps=30, eval_steps=10)
    space = write_space(tmp_path, {"train.lr": {"log_uniform": [1e-4, 1e-2]}, "method.r": {"choice": [2, 4, 8]}})
    args = [str(run), "--space", str(space), "--trials", "3", "--sampler", "random", "--pruner", "none",
            "--study", "k"]
    study_dir = tmp_path / "runs" / "k"
    worker = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "search", *args], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (study_dir / "trial-1" / "metrics.jsonl").exists():  # trial 0 done, trial 1 training
            assert worker.poll() is None, worker.stderr.read().decode()
            assert time.time() < deadline, "trial 1 never started"
            time.sleep(0.2)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    before = load_study(sqlite_url(study_dir), "k").trials
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]

    assert main(["search", *args, "--resume"]) == 0
    trials = load_study(sqlite_url(study_dir), "k").trials
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].params == before[1].params and "interrupted" in retry[0].user_attrs["retry_reason"]
    assert trials[1].state.name == "FAIL"
    counted = [t for t in trials if t.number != 1]
    assert len(counted) == 3 and all(t.state.name == "COMPLETE" for t in counted)
    assert [t.number for t in trials] == [0, 1, 2, 3]


def test_objectives_and_directions_are_the_metric_registry(tmp_path, data_dir):
    """search reads tuneforge eval's registry: every metric (and a newly registered one) is an objective with the
    registry's direction; aliases of one metric resolve; --help lists them."""
    from tuneforge.evaluate import metrics as tm
    from tuneforge.search.cli import _direction_help, _objective_help
    from tuneforge.search.study import SearchOptions, _objective, objectives, prepare

    assert objectives() == {"eval_loss": False, **{n: m.higher_is_better for n, m in tm.METRICS.items()}}
    assert _objective("perplexity") == ("ppl", False) and _objective("em") == ("exact", True)
    assert _objective("loss") == ("eval_loss", False) and _objective("reward_acc") == ("reward_acc", True)
    metric = tm.register(tm.Metric("tiny_score", tm.MODEL, lambda loaded, records, **_: 0.0, higher_is_better=False))
    try:
        assert _objective("tiny_score") == ("tiny_score", False)
        assert "tiny_score" in _objective_help() and "tiny_score" in _direction_help()
        search = prepare(SearchOptions(config=str(write_run(tmp_path, data_dir)), objective=metric.name,
                                       space=str(write_space(tmp_path, {"method.r": {"choice": [2, 4]}})),
                                       sampler="grid", pruner="none"))
        assert (search.objective, search.direction) == ("tiny_score", "minimize") and len(search.eval_records) == 20
    finally:
        del tm.METRICS["tiny_score"]


def test_an_objective_its_eval_records_cannot_give_is_refused_before_any_trial(tmp_path, data_dir):
    from tuneforge.errors import UserError
    from tuneforge.search.study import SearchOptions, prepare

    options = SearchOptions(config=str(write_run(tmp_path, data_dir)), objective="reward_acc", sampler="grid",
                            space=str(write_space(tmp_path, {"method.r": {"choice": [2, 4]}})), pruner="none")
    with pytest.raises(UserError, match=r"reward_acc needs preference pairs"):
        prepare(options)  # the eval file holds chat records: known at the door, not after a trained trial


def test_a_generation_objective_scores_each_trial_with_tuneforge_eval(tmp_path, data_dir):
    """A generation metric as --objective: the trial's value is what `tuneforge eval` gives its run with greedy
    settings and --max-new-tokens (a registered test metric: mean answer length, which the budget changes)."""
    from tuneforge.evaluate import metrics as tm
    from tuneforge.evaluate.runner import evaluate_model, generation_settings, load_eval_records

    def answer_chars(predictions, references):
        return sum(map(len, predictions)) / len(predictions)

    tm.register(tm.Metric("answer_chars", tm.GENERATION, answer_chars))
    try:
        run = write_run(tmp_path, data_dir)
        space = write_space(tmp_path, {"method.r": {"choice": [2]}})
        assert main(["search", str(run), "--space", str(space), "--sampler", "grid", "--pruner", "none",
                     "--study", "x", "--objective", "answer_chars", "--max-new-tokens", "6"]) == 0
        study = load_study(sqlite_url(tmp_path / "runs" / "x"), "x")
        (trial,) = study.trials
        records = load_eval_records(str(data_dir / "eval.jsonl"))
        scored = {n: evaluate_model(str(tmp_path / "runs" / "x" / "trial-0"), records, ["answer_chars"],
                                    generation_settings(max_new_tokens=n))["answer_chars"] for n in (2, 6)}
    finally:
        del tm.METRICS["answer_chars"]
    assert study.direction.name == "MAXIMIZE" and trial.state.name == "COMPLETE"
    assert trial.value == pytest.approx(scored[6]) and scored[6] > scored[2] > 0
