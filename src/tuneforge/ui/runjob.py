"""``python -m tuneforge.ui.runjob JOB.json``: run a UI job's command and record its exit code in the job file.

Started detached by :func:`tuneforge.ui.jobs.start_job` (own session): it outlives the UI. A SIGTERM sent to the
job's process group reaches the command directly (same group); this wrapper ignores it and keeps waiting, so the
command's own exit code (75 for a training run that checkpointed and stopped) is what gets recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _merge(path: Path, **fields) -> None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    record.update(fields)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    path = Path((argv or sys.argv[1:])[0])
    record = json.loads(path.read_text(encoding="utf-8"))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _merge(path, pid=os.getpid(), pgid=os.getpgid(0))
    print(f"$ {record['command']}", flush=True)
    try:
        # the child gets default signal handling back (ignored dispositions would be inherited)
        proc = subprocess.Popen(record["argv"], preexec_fn=lambda: (signal.signal(signal.SIGTERM, signal.SIG_DFL),
                                                                    signal.signal(signal.SIGINT, signal.SIG_DFL)))
    except OSError as exc:
        print(f"could not start: {exc}", flush=True)
        _merge(path, returncode=127, ended=time.time())
        return 127
    _merge(path, child_pid=proc.pid)
    code = proc.wait()
    print(f"[exit code {code}]", flush=True)
    _merge(path, returncode=code, ended=time.time())
    return 0


if __name__ == "__main__":
    sys.exit(main())
