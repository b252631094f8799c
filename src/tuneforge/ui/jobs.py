"""Long actions (train, eval, export, merge, abtest, report) as detached ``tuneforge`` processes.

A job is a plain file pair under ``<runs>/.tuneforge-ui/jobs/``: ``<id>.json`` (the command, pid, start time and,
once it ends, the exit code) and ``<id>.log`` (its output). The process runs in its own session
(``start_new_session=True``) under :mod:`tuneforge.ui.runjob`, which waits for it and records the exit code: closing
the page or restarting the UI neither stops it nor loses its result. ``tuneforge`` itself runs the work, exactly
as from a terminal (the command line is shown on the jobs page).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.ui.runs import UI_DIR, lock_holder, read_json
from tuneforge.utils import process_alive

KINDS = ("train", "resume", "eval", "export", "merge", "abtest", "report")


def jobs_dir(runs_dir: Path) -> Path:
    return runs_dir / UI_DIR / "jobs"


def tuneforge_argv(*args: str) -> list[str]:
    """``tuneforge ARGS`` run by this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "tuneforge", *args]


def start_job(runs_dir: Path, kind: str, args: list[str], *, run_dir: Path | None = None, title: str = "",
              extra: dict | None = None, cwd: Path | None = None) -> dict:
    """Start ``tuneforge ARGS`` detached; returns the job record (also written to ``<id>.json``)."""
    folder = jobs_dir(runs_dir)
    folder.mkdir(parents=True, exist_ok=True)
    job_id = time.strftime("%Y%m%d-%H%M%S-") + kind + "-" + secrets.token_hex(3)
    argv = tuneforge_argv(*args)
    record = {"id": job_id, "kind": kind, "title": title or f"{kind} {' '.join(args[:1])}",
              "command": "tuneforge " + shlex.join(args), "argv": argv,
              "run_dir": str(run_dir) if run_dir else None, "started": time.time(), "pid": None,
              "returncode": None, "ended": None, "log": str(folder / f"{job_id}.log"), **(extra or {})}
    path = folder / f"{job_id}.json"
    _write(path, record)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TUNEFORGE_UI_JOB=job_id)
    with open(folder / f"{job_id}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tuneforge.ui.runjob", str(path)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                start_new_session=True)
    # the wrapper writes its own pid into the job file (one writer per field: no lost update)
    record["pid"] = record["pgid"] = proc.pid
    record["alive"], record["state"] = True, "running"
    return record


def _write(path: Path, record: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def load_job(runs_dir: Path, job_id: str) -> dict | None:
    if not job_id or "/" in job_id or job_id.startswith("."):
        return None
    record = read_json(jobs_dir(runs_dir) / f"{job_id}.json")
    return _annotate(record) if isinstance(record, dict) else None


def _annotate(record: dict) -> dict:
    ended = record.get("returncode") is not None
    record["alive"] = not ended and process_alive(record.get("pid"))
    if ended:
        record["state"] = "finished" if record["returncode"] == 0 else (
            "interrupted" if record["returncode"] in (75, 143, -15) else "failed")
    elif record.get("pid") is None and time.time() - record.get("started", 0) < 30:
        record["alive"], record["state"] = True, "running"  # the wrapper has not written its pid yet
    else:
        record["state"] = "running" if record["alive"] else "failed"
    return record


def list_jobs(runs_dir: Path) -> list[dict]:
    """Every job record, newest first."""
    folder = jobs_dir(runs_dir)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json"), reverse=True):
        record = read_json(path)
        if isinstance(record, dict) and "id" in record:
            out.append(_annotate(record))
    return out


def log_tail(record: dict, max_bytes: int = 20000) -> str:
    try:
        with open(record["log"], "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except (OSError, KeyError):
        return ""
    # progress bars redraw with carriage returns: keep the last state of each line
    text = data.decode("utf-8", "replace")
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def stop_run(run_dir: Path, jobs: list[dict]) -> int:
    """SIGTERM to the process training ``run_dir`` (it saves a complete checkpoint and exits 75).

    Raises:
        UserError: nothing trains into the run.
    """
    pid = lock_holder(run_dir)
    if pid is None:
        for job in jobs:
            if job.get("run_dir") and Path(job["run_dir"]).resolve() == run_dir.resolve() and job.get("alive"):
                pid = job.get("child_pid")
                if pid is None:  # still starting: no trainer yet, stop the whole job
                    return stop_job(job)
                break
    if pid is None:
        raise UserError(f"{run_dir.name}: not running (no process holds its lock {run_dir.name})")
    os.kill(pid, signal.SIGTERM)
    return pid


def stop_job(record: dict) -> int:
    """SIGTERM to a job's process group (the wrapper passes it on and records the exit code)."""
    if not record.get("alive"):
        raise UserError(f"job {record.get('id')} is not running")
    pgid = record.get("pgid") or record["pid"]
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        raise UserError(f"job {record.get('id')} is not running") from None
    return pgid
