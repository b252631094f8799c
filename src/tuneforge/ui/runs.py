"""Runs as the UI shows them, read from run directories only (the CLI's files are the one source of truth).

A run's status comes from what is on disk and in the kernel:

* **running** — a process holds the run's lock (``runs/.<name>.lock``, :func:`tuneforge.train.rundir.lock_path`),
  or a UI job that trains it is still alive (``starting`` while no run directory exists yet);
* **finished** — ``summary.json`` says ``completed`` (or ``final/`` exists without a summary status);
* **interrupted** — ``summary.json`` says ``interrupted`` / ``stopped``, or the process is gone and a complete
  checkpoint is there to ``--resume`` from;
* **failed** — the process is gone, nothing to resume, no final model (or the job that trained it exited non-zero).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.models.reference import (
    RUN_CHECKPOINTS,
    RUN_CONFIG,
    RUN_EVAL_RESULTS,
    RUN_FINAL,
    RUN_MANIFEST,
    RUN_METRICS,
    RUN_REPORT,
    RUN_SUMMARY,
    RUN_TASKS,
    is_run_dir,
)
from tuneforge.utils import process_alive

#: hidden directory under --runs where the UI keeps its job records, generated configs and logs
UI_DIR = ".tuneforge-ui"
STATUSES = ("starting", "running", "finished", "failed", "interrupted")


@dataclass
class RunInfo:
    """One row of the runs table."""

    id: str                      # path relative to --runs ("demo", "parent/tasks/a")
    name: str
    kind: str = "run"            # run | per-task | study | trial
    stage: str | None = None
    method: str | None = None
    base: str | None = None
    status: str = "failed"
    step: int | None = None
    total: int | None = None
    last_loss: float | None = None
    updated: float | None = None
    pid: int | None = None
    has_final: bool = False
    has_report: bool = False
    resumable: bool = False
    children: list[str] = field(default_factory=list)
    job: str | None = None       # the UI job starting it, while no run directory exists yet

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- files


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when missing or (mid-write) unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_yaml(path: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(run_dir: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events of ``metrics.jsonl`` from byte ``offset`` on, and the offset after the last complete line.

    A line still being written (no newline yet) is left for the next call, so a poller never sees half an event.
    """
    path = run_dir / RUN_METRICS
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events, offset + end


# --------------------------------------------------------------------------- locks and processes



def lock_file(run_dir: Path) -> Path:
    """The run's lock file (the trainer's own rule: a hidden sibling)."""
    from tuneforge.train.rundir import lock_path

    return lock_path(run_dir)


def lock_holder(run_dir: Path) -> int | None:
    """The pid of the process holding the run's lock, or None when nobody trains into ``run_dir``.

    On Linux the kernel's lock table (``/proc/locks``) is read, so the UI never takes the lock itself (which could
    make a ``tuneforge train`` starting at that instant fail). Elsewhere the pid written in the lock file is
    checked for being alive.
    """
    path = lock_file(run_dir)
    try:
        stat = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    written = int(text) if text.isdigit() else None
    try:
        locks = Path("/proc/locks").read_text(encoding="ascii")
    except OSError:
        return written if process_alive(written) else None
    suffix = f":{stat.st_ino}"
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}{suffix}"
    for line in locks.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 8180 08:01:12345 0 EOF" (a "->" marks a waiter)
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        if parts[5] == device or (parts[5].endswith(suffix) and written is not None and parts[4] == str(written)):
            return int(parts[4]) if parts[4].isdigit() else written
    return None


# --------------------------------------------------------------------------- one run


def _config_facts(cfg: dict | None) -> dict:
    cfg = cfg or {}
    model = cfg.get("model") or {}
    method = cfg.get("method") or {}
    train = cfg.get("train") or {}
    if model.get("name_or_path"):
        base = str(model["name_or_path"])
    elif model.get("from_config"):
        fc = model["from_config"]
        base = f"from_config {fc.get('architecture', 'llama')} h{fc.get('hidden_size')} L{fc.get('num_layers')}"
    else:
        base = None
    return {"stage": cfg.get("stage"), "method": method.get("name"), "base": base,
            "total": train.get("max_steps")}


def _complete_checkpoint(run_dir: Path) -> bool:
    folder = run_dir / RUN_CHECKPOINTS
    try:
        return any((c / "COMPLETE").exists() for c in folder.iterdir() if c.name.startswith("checkpoint-"))
    except OSError:
        return False


def _newest_mtime(paths: list[Path]) -> float | None:
    times = []
    for p in paths:
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            pass
    return max(times) if times else None


def last_progress(run_dir: Path) -> dict:
    """Step, total steps and last training loss from the tail of ``metrics.jsonl`` (reads at most 64 KiB)."""
    path = run_dir / RUN_METRICS
    out: dict[str, Any] = {}
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            handle.seek(max(0, size - 65536))
            tail = handle.read().splitlines()
    except OSError:
        return out
    for line in reversed(tail):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        if "step" in event and "step" not in out:
            out["step"] = event["step"]
        if event.get("event") == "log" and "loss" in event and "loss" not in out:
            out["loss"] = event["loss"]
        if "max_steps" in event and "total" not in out:
            out["total"] = event["max_steps"]
        if len(out) == 3:
            break
    return out


def run_info(runs_dir: Path, run_dir: Path, jobs: dict[str, dict] | None = None) -> RunInfo:
    """Everything the runs table shows about one run directory."""
    rel = run_dir.relative_to(runs_dir).as_posix()
    cfg = read_yaml(run_dir / RUN_CONFIG)
    summary = read_json(run_dir / RUN_SUMMARY)
    summary = summary if isinstance(summary, dict) else {}
    facts = _config_facts(cfg)
    progress = last_progress(run_dir)
    info = RunInfo(id=rel, name=(cfg or {}).get("run_name") or run_dir.name, stage=facts["stage"],
                   method=facts["method"], base=facts["base"], total=facts["total"],
                   step=summary.get("global_step", progress.get("step")),
                   last_loss=summary.get("last_logged_loss", progress.get("loss")),
                   has_final=(run_dir / RUN_FINAL).is_dir(), has_report=(run_dir / RUN_REPORT).is_file(),
                   resumable=_complete_checkpoint(run_dir))
    info.total = info.total or progress.get("total") or summary.get("max_steps")
    info.updated = _newest_mtime([run_dir / RUN_METRICS, run_dir / RUN_SUMMARY, run_dir / RUN_CONFIG,
                                  run_dir / RUN_EVAL_RESULTS])
    pid = lock_holder(run_dir)
    job = (jobs or {}).get(str(run_dir.resolve()))
    if pid is None and job and job.get("alive"):
        pid = job.get("pid")
    state = summary.get("status")
    if pid is not None:
        # a resumed run still has the summary of its interruption: the live figures are in metrics.jsonl
        info.step, info.last_loss = progress.get("step", info.step), progress.get("loss", info.last_loss)
        info.status, info.pid = "running", pid
    elif state == "completed" or (state is None and info.has_final):
        info.status = "finished"
    elif state in ("interrupted", "stopped") or info.resumable:
        info.status = "interrupted"
    else:
        info.status = "failed"
    if info.status == "finished" and job and job.get("returncode") not in (None, 0) and not info.has_final:
        info.status = "failed"
    tasks = run_dir / RUN_TASKS
    if tasks.is_dir():
        info.kind = "per-task"
        info.children = sorted(f"{rel}/{RUN_TASKS}/{t.name}" for t in tasks.iterdir() if is_run_dir(t))
    return info


def list_runs(runs_dir: Path, jobs: list[dict] | None = None) -> list[RunInfo]:
    """Every run under ``runs_dir`` (hidden entries skipped), per-task parents with their task runs after them,
    search studies with their trials; plus ``starting`` rows for UI train jobs whose run directory does not exist
    yet."""
    by_dir = {str(Path(j["run_dir"]).resolve()): j for j in jobs or [] if j.get("run_dir")}
    rows: list[RunInfo] = []
    seen: set[str] = set()

    def visit(folder: Path, depth: int) -> None:
        try:
            entries = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for entry in entries:
            if is_run_dir(entry) or (entry / RUN_MANIFEST).is_file():
                info = run_info(runs_dir, entry, by_dir)
                if folder != runs_dir and (folder / "study.db").exists():
                    info.kind = "trial"
                rows.append(info)
                seen.add(str(entry.resolve()))
                for child in info.children:
                    child_info = run_info(runs_dir, runs_dir / child, by_dir)
                    child_info.kind = "task"
                    rows.append(child_info)
                    seen.add(str((runs_dir / child).resolve()))
            elif (entry / "study.db").exists() or (entry / "search.html").exists():
                rows.append(RunInfo(id=entry.relative_to(runs_dir).as_posix(), name=entry.name, kind="study",
                                    status="finished" if (entry / "search.html").exists() else "running",
                                    updated=_newest_mtime([entry / "study.db", entry / "search.html"])))
                visit(entry, depth + 1)
            elif depth == 0:
                visit(entry, depth + 1)  # one level of grouping folders (runs/<group>/<run>)

    visit(runs_dir, 0)
    for job in jobs or []:
        run_dir = job.get("run_dir")
        if job.get("kind") == "train" and run_dir and str(Path(run_dir).resolve()) not in seen:
            alive = job.get("alive")
            name = Path(run_dir).name
            rel = Path(run_dir).resolve().relative_to(runs_dir.resolve()).as_posix() \
                if Path(run_dir).resolve().is_relative_to(runs_dir.resolve()) else name
            rows.append(RunInfo(id=rel, name=name, status="starting" if alive else "failed", pid=job.get("pid"),
                                updated=job.get("started"), stage=job.get("stage"), method=job.get("method"),
                                job=job.get("id")))
    return rows


def run_detail(runs_dir: Path, run_dir: Path) -> dict:
    """The run page's static parts: config, summary, eval results, warnings."""
    events, _ = read_metrics(run_dir)
    warnings = [e for e in events if e.get("event") == "warning"]
    evals = read_json(run_dir / RUN_EVAL_RESULTS)
    return {
        "info": run_info(runs_dir, run_dir).to_json(),
        "config": (run_dir / RUN_CONFIG).read_text(encoding="utf-8") if (run_dir / RUN_CONFIG).is_file() else "",
        "summary": read_json(run_dir / RUN_SUMMARY),
        "eval_results": evals,
        "warnings": warnings,
        "time": time.time(),
    }
