"""Builders shared by the serve tests: a tiny saved base, a per-task run layout, a real server on 127.0.0.1.

Plain functions and context managers (fixtures stay in the test files, built from these).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import yaml

from tests.helpers import make_run, save_base, tiny_from_config


def tiny_base(folder: Path, tokenizer, *, seed: int = 0) -> Path:
    """A seeded 2-layer, hidden-64 Llama built from config, saved with ``tokenizer`` and the chatml template."""
    import torch

    from tuneforge.models import build_model

    torch.manual_seed(seed)
    return save_base(build_model(tiny_from_config("llama"), tokenizer), tokenizer, folder)


def make_per_task_run(run_dir: Path, base_dir: Path, tasks: dict[str, dict]) -> Path:
    """A per-task run as ``method.per_task`` lays it out: ``run_dir`` (config.yaml, manifest) and one complete run
    per task in ``run_dir/tasks/<task>/`` (``make_run``: a LoRA adapter on ``base_dir`` in ``final/``).

    Args:
        tasks: ``{task: {"seed": int, "task_prefix": bool, ...make_run/make_adapter keywords}}``; ``task_prefix``
            is written as the task run's ``data.task_prefix`` (trained with ``[task] `` on the first user turn).
    """
    from tuneforge.models.reference import RUN_CONFIG, RUN_MANIFEST, RUN_TASKS

    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "run_name": run_dir.name,
        "model": {"name_or_path": str(base_dir)},
        "method": {"name": "lora", "per_task": True},
        "data": {"train": ["x.jsonl"]},
    }
    (run_dir / RUN_CONFIG).write_text(yaml.safe_dump(config), encoding="utf-8")
    (run_dir / RUN_MANIFEST).write_text(json.dumps({"tool": "tuneforge"}), encoding="utf-8")
    for task, options in tasks.items():
        options = dict(options)
        prefix = options.pop("task_prefix", False)
        task_dir = make_run(run_dir / RUN_TASKS / task, base_dir, **options)
        task_config = yaml.safe_load((task_dir / RUN_CONFIG).read_text(encoding="utf-8"))
        task_config["data"]["task_prefix"] = prefix
        (task_dir / RUN_CONFIG).write_text(yaml.safe_dump(task_config), encoding="utf-8")
    return run_dir


@contextlib.contextmanager
def running_server(
    specs: list[str], *, engine_options: dict | None = None, engine=None, **app_options
) -> Iterator[tuple[str, object]]:
    """Serve ``specs`` (or an ``engine`` already built) on a free loopback port; yields ``(base_url, engine)``.

    ``engine_options`` go to ``Engine`` (device is CPU), ``app_options`` to ``create_app``. The scheduler of an
    engine built here is closed on the way out.
    """
    from tuneforge.serve.app import create_app
    from tuneforge.serve.background import serve_in_thread
    from tuneforge.serve.engine import Engine

    own = engine is None
    if own:
        engine = Engine(specs, device="cpu", **(engine_options or {}))
    try:
        with serve_in_thread(create_app(engine, **app_options)) as url:
            yield url, engine
    finally:
        if own:
            engine.scheduler.close()
