"""Two ``tuneforge search`` worker processes on one study in a real PostgreSQL server (tests/helpers_pg.py)."""

from __future__ import annotations

import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest

from tests.helpers_pg import postgres_url  # noqa: F401  (the fixture)
from tests.helpers_search import write_data, write_run, write_space

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("search-data"))


def run_workers(args: list[str], cwd: Path, n: int = 2) -> list[str]:
    """Start ``n`` workers at once with the same arguments; returns their stdout (each must exit 0)."""
    workers = [subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "search", *args], cwd=cwd, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(n)]
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
        outputs.append(out)
    return outputs


def counted_trials(url: str, name: str):
    import optuna

    trials = optuna.load_study(study_name=name, storage=url).trials
    discarded = {t.number for t in trials if t.user_attrs.get("discarded")}
    return trials, [t for t in trials if t.number not in discarded]


def test_two_workers_share_a_grid_and_never_run_a_point_twice(tmp_path, data_dir, postgres_url):  # noqa: F811
    run = write_run(tmp_path, data_dir, max_steps=4, eval_steps=2)
    space = write_space(tmp_path, {"train.lr": {"choice": [3e-3, 1e-3]}, "method.r": {"choice": [2, 4]}})
    run_workers([str(run), "--space", str(space), "--sampler", "grid", "--storage", postgres_url, "--study", "grid",
                 "--resume", "--pruner", "none"], tmp_path)
    _, trials = counted_trials(postgres_url, "grid")
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials), [t.user_attrs for t in trials]
    assert sorted((t.params["train.lr"], t.params["method.r"]) for t in trials) == sorted(product([3e-3, 1e-3], [2, 4]))
    for t in trials:  # each point trained once, in its own run directory
        assert (tmp_path / "runs" / "grid" / f"trial-{t.number}" / "final").is_dir()


def test_two_workers_together_finish_exactly_the_requested_trials(tmp_path, data_dir, postgres_url):  # noqa: F811
    run = write_run(tmp_path, data_dir, max_steps=4, eval_steps=2)
    space = write_space(tmp_path, {"train.lr": {"log_uniform": [1e-4, 1e-2]}, "method.r": {"int": [2, 8]}})
    outputs = run_workers([str(run), "--space", str(space), "--trials", "4", "--sampler", "random", "--storage",
                           postgres_url, "--study", "rand", "--resume", "--pruner", "none"], tmp_path)
    every, trials = counted_trials(postgres_url, "rand")
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials), [t.user_attrs for t in trials]
    assert len({(t.params["train.lr"], t.params["method.r"]) for t in trials}) == 4
    workers = [t.user_attrs["worker"] for t in trials]
    assert len(set(workers)) == 2, f"one worker ran everything: {workers}"  # both took part
    ran = [int(out.split("this worker ran ")[1].split()[0]) for out in outputs]
    assert sum(ran) == 4  # no trial run twice, none lost
    dirs = sorted(p.name for p in (tmp_path / "runs" / "rand").glob("trial-*"))
    assert dirs == sorted(f"trial-{t.number}" for t in trials)
    assert all(t.state.name == "FAIL" for t in every if t.user_attrs.get("discarded"))
