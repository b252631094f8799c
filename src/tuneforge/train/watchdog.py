"""A watchdog for multi-process runs: collective timeouts, a per-rank heartbeat, and a loud stop on a dead or stalled rank.

Without it, a rank that dies or stalls inside a collective leaves the others waiting (gloo's default is 30 minutes,
and the HF Trainer does not pass ``ddp_timeout`` to the process group on CPU). With it (docs/distributed.md,
"Watchdog"):

* **Collective timeout.** ``distributed.timeout`` (seconds, default 600) is the Trainer's ``ddp_timeout`` and is
  also set on the initialised process group itself (:func:`apply_collective_timeout`), so an all-reduce or barrier
  that waits longer fails on every rank that waits.
* **Heartbeat.** Every rank keeps ``<run>/.heartbeat/rank-N.json`` current: its step, the operation it is in
  (``forward/backward``, ``optimizer step``, ``log``, ``evaluate``, ``save checkpoint``), since when, its pid and
  host. A :class:`~transformers.TrainerCallback` only updates fields in memory; a background thread writes the file
  (atomically, no fsync) once a second, so a stalled rank's file still says where it stalls.
* **Stop.** The rank whose collective fails (or whose thread sees a same-host peer process gone) names the culprit
  from the heartbeats — ``watchdog: rank 1 stalled at step 3 in forward/backward ...`` — writes it to
  ``<run>/.heartbeat/abort-<launch>.json`` and stops with exit code 4 (:class:`RankFailed`); every other rank's
  thread sees that file within a second and exits with the same message. The launcher (``tuneforge train --nproc``)
  prints the message again with torchrun's view of the failed ranks (:func:`describe_failures`). Checkpoints are
  marked ``COMPLETE`` only after every rank wrote its part, so ``--resume`` continues from the last whole one.
* **Fault injection (a test hook, never for production):** ``TUNEFORGE_FAULT="stall:rank=1:step=3"`` makes rank 1
  sleep for ever when it begins step 3; ``kill:rank=1:step=3`` makes it SIGKILL itself there (after writing its
  heartbeat); an optional ``:op=optimizer`` or ``:op=save`` moves the fault to the optimizer step or to just before
  the step's checkpoint is saved. ``tests/test_watchdog.py`` uses it.

Light module: torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError
from tuneforge.utils import process_alive

HEARTBEAT_DIR = ".heartbeat"
#: where the ranks write their heartbeats (set by the launcher to ``<output_dir>/.heartbeat``)
HEARTBEAT_ENV = "TUNEFORGE_HEARTBEAT_DIR"
#: one id per launch, so that heartbeats and abort files of an earlier launch of the run are ignored
LAUNCH_ENV = "TUNEFORGE_LAUNCH_ID"
#: fault injection for tests: ``stall|kill:rank=R:step=S[:op=forward|optimizer|save]``
FAULT_ENV = "TUNEFORGE_FAULT"
EXIT_CODE = 4
INTERVAL = 1.0  # seconds between heartbeat writes (and abort/peer checks)
DEFAULT_TIMEOUT = 600.0

FORWARD, OPTIMIZER, LOG, EVALUATE, SAVE = "forward/backward", "optimizer step", "log", "evaluate", "save checkpoint"
STARTING, DONE, FAILED, WAITING = "starting", "done", "failed", "collective failed"
INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM reached every rank: a stop, not a fault to blame on a peer
_FAULT_OPS = {"forward": FORWARD, "optimizer": OPTIMIZER, "save": SAVE}


class RankFailed(UserError):
    """A rank died or stalled during a multi-process run; every rank stopped. ``--resume`` continues from the last
    complete checkpoint."""

    exit_code = EXIT_CODE


# ----------------------------------------------------------------------------- where, which launch


def heartbeat_dir(run_dir: str | Path, env: dict | None = None) -> Path:
    """The heartbeat folder: ``$TUNEFORGE_HEARTBEAT_DIR`` (the launcher's choice) or ``<run_dir>/.heartbeat``."""
    env = os.environ if env is None else env
    return Path(env.get(HEARTBEAT_ENV) or Path(os.path.abspath(run_dir)) / HEARTBEAT_DIR)


def launch_id(env: dict | None = None) -> str:
    """This launch's id: the launcher's ``TUNEFORGE_LAUNCH_ID``, else torchrun's run id and restart count."""
    env = os.environ if env is None else env
    if env.get(LAUNCH_ENV):
        return env[LAUNCH_ENV]
    raw = f"{env.get('TORCHELASTIC_RUN_ID', 'none')}-{env.get('MASTER_PORT', '')}-" \
          f"{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


def launch_env(output_dir: str | Path) -> dict[str, str]:
    """Environment the launcher gives torchrun (and so every rank): the heartbeat folder and a fresh launch id."""
    return {HEARTBEAT_ENV: str(Path(os.path.abspath(output_dir)) / HEARTBEAT_DIR), LAUNCH_ENV: uuid.uuid4().hex[:12]}


def abort_path(folder: Path, launch: str) -> Path:
    return Path(folder) / f"abort-{launch}.json"


# ----------------------------------------------------------------------------- fault injection (tests only)


@dataclass(frozen=True)
class Fault:
    """An injected fault: ``kind`` stall or kill, on ``rank`` when it reaches ``step`` in operation ``op``."""

    kind: str
    rank: int
    step: int
    op: str = FORWARD


def parse_fault(text: str | None) -> Fault | None:
    """``TUNEFORGE_FAULT``'s value → a :class:`Fault` (None when unset or empty).

    Raises:
        UserError: a malformed value, naming the expected form.
    """
    if not text or not text.strip():
        return None
    form = "expected e.g. stall:rank=1:step=3 or kill:rank=1:step=3[:op=forward|optimizer|save]"
    kind, *parts = text.strip().split(":")
    fields = dict(part.partition("=")[::2] for part in parts)
    if kind not in ("stall", "kill") or not {"rank", "step"} <= set(fields) or set(fields) - {"rank", "step", "op"}:
        raise UserError(f"{FAULT_ENV}={text!r}: {form}")
    if fields.get("op", "forward") not in _FAULT_OPS:
        raise UserError(f"{FAULT_ENV}={text!r}: op must be one of {', '.join(_FAULT_OPS)}")
    try:
        rank, step = int(fields["rank"]), int(fields["step"])
    except ValueError:
        raise UserError(f"{FAULT_ENV}={text!r}: rank and step must be whole numbers; {form}") from None
    return Fault(kind, rank, step, _FAULT_OPS[fields.get("op", "forward")])


# ----------------------------------------------------------------------------- heartbeats


def _write_json(path: Path, data: dict) -> None:
    """Atomic (write + rename), no fsync: a heartbeat is worthless after a power loss anyway."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_heartbeats(folder: str | Path, launch: str | None = None) -> dict[int, dict]:
    """Rank → its last heartbeat (only this launch's when ``launch`` is given)."""
    beats: dict[int, dict] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return beats
    for path in folder.glob("rank-*.json"):
        beat = _read_json(path)
        if beat and (launch is None or beat.get("launch") == launch):
            beats[int(beat["rank"])] = beat
    return beats


def where(beat: dict) -> str:
    """``at step 3 in forward/backward`` from a heartbeat."""
    return f"at step {beat.get('step')} in {beat.get('op')}"


def _process(beat: dict) -> str:
    return f"pid {beat.get('pid')} on {beat.get('host')}"


class Heartbeat:
    """This rank's heartbeat: fields set cheaply by the callback, written by a thread once a second.

    The thread also stops this process when another rank wrote this launch's abort file, and when a peer process
    on this host is gone without having finished (it was killed, or crashed).
    """

    def __init__(self, folder: Path, rank: int, world_size: int, local_rank: int = 0, local_world_size: int = 1,
                 launch: str | None = None, run_dir: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT,
                 interval: float = INTERVAL, report: Any = None) -> None:
        self.folder = Path(folder)
        self.rank, self.world_size = rank, world_size
        first = rank - local_rank
        self.local_peers = [r for r in range(first, first + local_world_size) if r != rank and 0 <= r < world_size]
        self.launch = launch or launch_id()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.timeout_s = timeout_s
        self.interval = interval
        self.report = report  # report(exit_code): leaves the code for the launcher (distributed.report_status)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.step, self.op, self.since, self.error = 0, STARTING, time.time(), None
        self.fault_at: float | None = None  # when an injected fault (tests) struck
        self.started = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._aborting = False

    @property
    def path(self) -> Path:
        return self.folder / f"rank-{self.rank}.json"

    def enter(self, step: int, op: str) -> None:
        """This rank is now in ``op`` of ``step`` (memory only; the thread writes it)."""
        if op != self.op or step != self.step:
            self.step, self.op, self.since = step, op, time.time()

    def record(self) -> dict:
        record = {"launch": self.launch, "rank": self.rank, "world_size": self.world_size, "host": self.host,
                  "pid": self.pid, "step": self.step, "op": self.op, "since": self.since, "time": time.time()}
        if self.error:
            record["error"] = self.error
        if self.fault_at is not None:
            record["fault_at"] = self.fault_at
        return record

    def write(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            _write_json(self.path, self.record())

    # -- the thread

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write()
        self._thread = threading.Thread(target=self._loop, name="tuneforge-watchdog", daemon=True)
        self._thread.start()

    def stop(self, op: str = DONE, error: str | None = None) -> None:
        """End the thread and leave the final state (``done``, ``failed``) in the file for the peers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.op, self.since, self.error = op, time.time(), error
        self.write()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a watchdog bug must never stop training
                pass

    def check(self) -> None:
        """Stop this process if another rank aborted the launch, or abort it for a dead peer on this host."""
        abort = _read_json(abort_path(self.folder, self.launch))
        if abort and abort.get("rank") != self.rank and float(abort.get("time", 0)) >= self.started - 5:
            self._exit(f"rank {self.rank}: stopped by the watchdog. {abort.get('message', '')}")
        for peer in self.local_peers:
            beat = _read_json(self.folder / f"rank-{peer}.json")
            if not beat or beat.get("launch") != self.launch or beat.get("op") in (DONE, INTERRUPTED):
                continue
            if beat.get("host") == self.host and not process_alive(int(beat.get("pid", 0))):
                what = f"failed ({beat['error']})" if beat.get("error") else "died"
                message = (f"watchdog: rank {peer} {what} {where(beat)} ({_process(beat)} is gone). Rank "
                           f"{self.rank} saw it; every rank stopped. {resume_hint(self.run_dir)}")
                self.abort(message)
                self._exit(message)

    def abort(self, message: str) -> str:
        """Publish ``message`` as this launch's abort (the first rank to publish wins); returns the published one."""
        self._aborting = True
        path = abort_path(self.folder, self.launch)
        try:
            fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            existing = _read_json(path)
            return existing.get("message", message) if existing else message
        except OSError:
            return message
        with os.fdopen(fd, "w") as handle:
            json.dump({"rank": self.rank, "message": message, "time": time.time()}, handle)
        return message

    def _exit(self, message: str) -> None:
        """Leave now (from the thread: the main thread may be blocked in a collective for ever)."""
        with contextlib.suppress(Exception):
            self.op, self.since, self.error = FAILED, time.time(), "stopped by the watchdog"
            self.write()
            print(message, file=sys.stderr, flush=True)
            sys.stdout.flush()
            if self.report is not None:
                self.report(EXIT_CODE)
        os._exit(EXIT_CODE)


def resume_hint(run_dir: Path | None) -> str:
    """``Run the same command with --resume: it continues from checkpoint-6 ...`` (the last complete checkpoint)."""
    if run_dir is None:
        return "Run the same command with --resume to continue from the last complete checkpoint."
    from tuneforge.train.checkpoints import latest_checkpoint

    last = latest_checkpoint(Path(run_dir) / "checkpoints")
    if last is None:
        return "No checkpoint was complete yet: run the same command again (without --resume) to start over."
    return f"Run the same command with --resume: it continues from {last.name}, the last complete checkpoint."


# ----------------------------------------------------------------------------- naming the culprit


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failed or timed-out collective / a lost peer connection."""
    seen = 0
    while exc is not None and seen < 5:
        name = type(exc).__name__
        if name in ("DistBackendError", "DistNetworkError", "DistStoreError", "DistError"):
            return True
        if isinstance(exc, (RuntimeError, ConnectionError, TimeoutError)) and re.search(
                r"gloo|nccl|timed out|timeout|connection (closed|reset|refused)|broken pipe|socket|peer",
                str(exc), re.IGNORECASE):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def culprits(beats: dict[int, dict], me: int, world_size: int, host: str, now: float | None = None) -> list[str]:
    """One phrase per rank that is to blame, most certain first: failed, gone, silent, then stalled."""
    now = time.time() if now is None else now
    failed, gone, silent, stalled, missing = [], [], [], [], []
    for rank in range(world_size):
        if rank == me:
            continue
        beat = beats.get(rank)
        if beat is None:
            missing.append(f"rank {rank} (no heartbeat)")
        elif beat.get("op") in (WAITING, DONE, INTERRUPTED):
            continue
        elif beat.get("error") and beat.get("op") == FAILED:
            failed.append(f"rank {rank} failed at step {beat.get('step')} ({beat['error']})")
        elif beat.get("host") == host and not process_alive(int(beat.get("pid", 0))):
            gone.append(f"rank {rank} died {where(beat)} ({_process(beat)} is gone)")
        elif now - float(beat.get("time", now)) > 5 * INTERVAL + 5:
            silent.append(f"rank {rank} stopped responding {where(beat)} (no heartbeat for "
                          f"{now - float(beat['time']):.0f} s; {_process(beat)})")
        else:
            stalled.append(f"rank {rank} stalled {where(beat)} (no progress for "
                           f"{now - float(beat.get('since', now)):.1f} s; {_process(beat)})")
    return failed + gone + silent + stalled + missing


def collective_failure(heartbeat: Heartbeat, exc: BaseException) -> RankFailed:
    """This rank's collective failed: name the culprit from the heartbeats, publish it, and return the error."""
    heartbeat.enter(heartbeat.step, WAITING)
    heartbeat.write()
    # A lost connection (not a timeout) means a peer is dying: give the kernel a moment to end its process, so that
    # it is named as dead rather than stalled. With more than two ranks, give the other waiting ranks a moment to
    # say that they were waiting too.
    timed_out = bool(re.search(r"timed out|timeout", str(exc), re.IGNORECASE))
    deadline = time.time() + (3.0 if heartbeat.world_size > 2 or not timed_out else 0.0)
    while True:
        beats = read_heartbeats(heartbeat.folder, heartbeat.launch)
        blamed = culprits(beats, heartbeat.rank, heartbeat.world_size, heartbeat.host)
        settled = (timed_out or not any(" stalled " in b for b in blamed)) and len(blamed) <= 1
        if settled or time.time() >= deadline:
            break
        time.sleep(0.2)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's source path
    first = first if len(first) <= 120 else first[:119] + "…"
    seen = f"rank {heartbeat.rank}'s collective failed (distributed.timeout {heartbeat.timeout_s:g} s): {first}"
    if blamed:
        message = f"watchdog: {'; '.join(blamed)}. {seen}. Every rank stopped. {resume_hint(heartbeat.run_dir)}"
    else:
        message = f"watchdog: {seen}. Every rank stopped. {resume_hint(heartbeat.run_dir)}"
    message = heartbeat.abort(message)
    return RankFailed(message)


def describe_failures(failures: dict, env: dict | None = None) -> str:
    """The launcher's line for torchrun's failed ranks (``{rank: ProcessFailure}``), with each one's last heartbeat,
    and the watchdog's message when a rank published one."""
    env = os.environ if env is None else env
    folder = Path(env[HEARTBEAT_ENV]) if env.get(HEARTBEAT_ENV) else None
    launch = env.get(LAUNCH_ENV)
    beats = read_heartbeats(folder, launch) if folder and launch else {}
    parts = []
    for rank, failure in sorted(failures.items(), key=lambda item: getattr(item[1], "timestamp", 0)):
        code = int(getattr(failure, "exitcode", 0) or 0)
        how = f"exit {code}"
        if code < 0:
            with contextlib.suppress(ValueError):
                how = f"killed by {signal.Signals(-code).name}"
        beat = beats.get(int(rank))
        if not beat:
            parts.append(f"rank {rank} {how}")
        elif beat.get("op") in (FAILED, WAITING, DONE, INTERRUPTED):  # it left on its own: say how, not an operation
            state = beat.get("error") or ("its collective failed" if beat.get("op") == WAITING else beat.get("op"))
            parts.append(f"rank {rank} {how} ({state}, step {beat.get('step')})")
        else:
            parts.append(f"rank {rank} {how}, last heartbeat at step {beat.get('step')} in {beat.get('op')}")
    line = "torchrun: " + ", ".join(parts)
    abort = _read_json(abort_path(folder, launch)) if folder and launch else None
    if abort and abort.get("message"):
        line += "\n" + abort["message"]
    return line


# ----------------------------------------------------------------------------- the hook in the fit phase


def apply_collective_timeout(seconds: float) -> int:
    """Set ``seconds`` as the timeout of every process group this rank belongs to (gloo and NCCL).

    The Trainer passes ``ddp_timeout`` to ``init_process_group`` on GPUs only; on CPU the group keeps gloo's 30
    minutes unless it is set here. Engines make groups of their own with that 30-minute default — DeepSpeed ZeRO
    all-reduces gradients in its data-parallel group (``new_group``), made when the Trainer prepares the engine
    inside ``train()`` — so this runs again when training begins (:func:`heartbeat_callback`). Returns the number
    of groups set (0 without an initialised group, or on a torch without ``_set_pg_timeout``).
    """
    from datetime import timedelta

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    try:
        from torch.distributed.distributed_c10d import _rank_not_in_group, _set_pg_timeout, _world
    except ImportError:  # an older torch: ddp_timeout (GPUs) is all there is
        return 0
    groups = [group for group in list(_world.pg_map) if not _rank_not_in_group(group)]
    for group in groups:
        _set_pg_timeout(timedelta(seconds=seconds), group)
    return len(groups)


def heartbeat_callback(heartbeat: Heartbeat, fault: Fault | None = None):
    """A ``TrainerCallback`` that moves ``heartbeat`` from operation to operation (and injects ``fault``)."""
    from transformers import TrainerCallback

    def inject(step: int, op: str) -> None:
        if fault is None or fault.rank != heartbeat.rank or fault.step != step or fault.op != op:
            return
        heartbeat.enter(step, op)
        heartbeat.fault_at = time.time()
        heartbeat.write()
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # stall: the heartbeat thread keeps writing; only the watchdog ends this process
            time.sleep(3600)

    class HeartbeatCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            apply_collective_timeout(heartbeat.timeout_s)  # the groups the engine made while it was prepared
            heartbeat.enter(state.global_step, STARTING)

        def on_step_begin(self, args, state, control, **kwargs):
            heartbeat.enter(state.global_step + 1, FORWARD)
            inject(state.global_step + 1, FORWARD)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            heartbeat.enter(state.global_step + 1, OPTIMIZER)
            inject(state.global_step + 1, OPTIMIZER)

        def on_step_end(self, args, state, control, **kwargs):
            # Added after the Trainer's flow callback: the flags say what the Trainer does next in this step.
            op = EVALUATE if control.should_evaluate else SAVE if control.should_save else LOG
            heartbeat.enter(state.global_step, op)
            if op == SAVE:
                inject(state.global_step, SAVE)

        def on_prediction_step(self, args, state, control, **kwargs):
            if heartbeat.op != EVALUATE:
                heartbeat.enter(state.global_step, EVALUATE)

        def on_evaluate(self, args, state, control, **kwargs):
            heartbeat.enter(state.global_step, SAVE if control.should_save else LOG)
            if control.should_save:
                inject(state.global_step, SAVE)

    return HeartbeatCallback()


@contextlib.contextmanager
def watching(trainer: Any, setup: Any, report: Any = None):
    """The span of ``trainer.train()`` on a multi-process run: collective timeout, heartbeat, a named stop.

    Args:
        trainer: the built Trainer (the heartbeat callback is added last, after the Trainer's flow callback).
        setup: the prepared run (:class:`tuneforge.train.phases.Setup`: ``cfg``, ``run_dir``, ``me``).
        report: ``report(exit_code)`` for a rank that the watchdog ends from its thread
            (``distributed.report_status``: the launcher returns that code).

    Raises:
        RankFailed: a collective failed or timed out on this rank (the message names the rank to blame).
    """
    cfg, run_dir, me = setup.cfg, setup.run_dir, setup.me
    if not me.distributed:
        yield
        return
    timeout_s = float(cfg.distributed.timeout)
    apply_collective_timeout(timeout_s)
    fault = parse_fault(os.environ.get(FAULT_ENV))
    heartbeat = Heartbeat(heartbeat_dir(run_dir), me.rank, me.world_size, me.local_rank, me.local_world_size,
                          run_dir=run_dir, timeout_s=timeout_s, report=report)
    trainer.add_callback(heartbeat_callback(heartbeat, fault))
    heartbeat.start()
    try:
        yield
    except BaseException as exc:
        if is_collective_failure(exc):
            heartbeat.stop(WAITING)
            raise collective_failure(heartbeat, exc) from exc
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # Ctrl-C or a second SIGTERM: every rank got it
            heartbeat.stop(INTERRUPTED)
            raise
        heartbeat.stop(FAILED, error=(f"{type(exc).__name__}: {str(exc).strip()[:200]}"))
        raise
    heartbeat.stop(DONE)
