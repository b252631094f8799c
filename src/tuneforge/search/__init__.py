"""Hyperparameter search on Optuna (``tuneforge search``): spaces over run-config keys, grid / random / TPE
sampling, pruning on intermediate evals, SQLite or shared RDB storage, leaderboard, ``search.html``, ``best.yaml``.

Public entry points (imported lazily; Optuna is an optional extra, ``tuneforge[search]``):

* ``load_space(path, base_raw) -> Space`` — parse and check a space file against a run config;
* ``SearchOptions``, ``prepare(options) -> Search`` — every door check, no trial started;
* ``run_search(search) -> SearchResult`` — run trials until the study's budget is met;
* ``rows(study, direction)``, ``write_best(search, row)``, ``write_html(search, study, rows)`` — results.
"""

from __future__ import annotations

from tuneforge.utils import lazy_exports

_EXPORTS = {
    "load_space": "tuneforge.search.space",
    "Space": "tuneforge.search.space",
    "SearchOptions": "tuneforge.search.study",
    "Search": "tuneforge.search.study",
    "prepare": "tuneforge.search.study",
    "run_search": "tuneforge.search.study",
    "rows": "tuneforge.search.results",
    "write_best": "tuneforge.search.results",
    "write_html": "tuneforge.search.results",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
