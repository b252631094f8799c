"""The distributed watchdog (train/watchdog.py): collective timeout, per-rank heartbeat, a named stop on a dead or
stalled rank, and a run that resumes to the uninterrupted weights afterwards.

The fast tests check the pieces in process; the slow ones launch 2-process gloo runs the way a user does
(``tuneforge train run.yaml --nproc 2``) with a fault injected through ``TUNEFORGE_FAULT`` (a test hook).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.helpers import write_chat_items
from tuneforge.config import validate_config
from tuneforge.errors import UserError
from tuneforge.train import distributed, watchdog

# ----------------------------------------------------------------------------- fast: the pieces


def test_fault_hook_parses_the_documented_forms_and_refuses_others():
    assert watchdog.parse_fault(None) is None and watchdog.parse_fault("") is None
    assert watchdog.parse_fault("stall:rank=1:step=3") == watchdog.Fault("stall", 1, 3, watchdog.FORWARD)
    assert watchdog.parse_fault("kill:rank=0:step=5:op=optimizer") == watchdog.Fault("kill", 0, 5, watchdog.OPTIMIZER)
    assert watchdog.parse_fault("kill:rank=0:step=4:op=save").op == watchdog.SAVE
    for bad in ("hang:rank=1:step=3", "stall:rank=1", "stall:rank=x:step=3", "stall:rank=1:step=3:op=eval",
                "stall:rank=1:step=3:when=now"):
        with pytest.raises(UserError, match="TUNEFORGE_FAULT"):
            watchdog.parse_fault(bad)


def _raw(tmp_path: Path, **distributed_section) -> dict:
    return {"run_name": "r", "output_dir": str(tmp_path / "r"), "model": {"name_or_path": "x"},
            "data": {"train": ["t.jsonl"]}, "distributed": distributed_section}


def test_distributed_timeout_is_seconds_and_becomes_the_collective_timeout(tmp_path):
    two = distributed.World(rank=0, world_size=2, local_world_size=2)
    cfg = validate_config(_raw(tmp_path))
    assert cfg.distributed.timeout == 600  # the documented default
    assert distributed.trainer_arguments(cfg, tmp_path, two, "cpu")["ddp_timeout"] == 600
    cfg = validate_config(_raw(tmp_path, timeout=20))
    assert distributed.trainer_arguments(cfg, tmp_path, two, "cpu")["ddp_timeout"] == 20
    # the key of older configs (and of older runs' config.yaml) still reads, in minutes
    assert validate_config(_raw(tmp_path, timeout_minutes=5)).distributed.timeout == 300
    with pytest.raises(Exception, match="timeout"):
        validate_config(_raw(tmp_path, timeout=0))


def test_the_collective_timeout_reaches_every_group_including_one_an_engine_made_later():
    # DeepSpeed ZeRO all-reduces in a group of its own (new_group, gloo's 30-minute default): a stalled rank went
    # undetected there until every group got the timeout. A one-process gloo world in a child process (the test
    # process must not keep a process group).
    code = """
import torch, torch.distributed as dist
from tuneforge.train.watchdog import apply_collective_timeout
timeout = lambda g: g._get_backend(torch.device('cpu')).options._timeout.total_seconds()
dist.init_process_group('gloo', rank=0, world_size=1, store=dist.HashStore())
engine_group = dist.new_group([0])
assert timeout(engine_group) == 1800, timeout(engine_group)
print(apply_collective_timeout(7), timeout(dist.group.WORLD), timeout(engine_group))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["2", "7.0", "7.0"]


def test_ddp_timeout_exists_in_the_installed_transformers():
    from transformers import TrainingArguments

    assert "ddp_timeout" in TrainingArguments.__dataclass_fields__


def test_collective_failures_are_told_from_other_errors():
    assert watchdog.is_collective_failure(RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation"))
    assert watchdog.is_collective_failure(RuntimeError("Connection reset by peer"))
    wrapped = ValueError("outer")
    wrapped.__cause__ = RuntimeError("NCCL communicator was aborted")
    assert watchdog.is_collective_failure(wrapped)
    assert not watchdog.is_collective_failure(ValueError("shapes do not match"))
    assert not watchdog.is_collective_failure(RuntimeError("CUDA out of memory"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _beat(rank: int, op: str, step: int = 3, pid: int | None = None, host: str = "h", since: float | None = None,
          **extra) -> dict:
    now = time.time()
    return {"launch": "L", "rank": rank, "host": host, "pid": pid or os.getpid(), "step": step, "op": op,
            "since": now - 20 if since is None else since, "time": now, **extra}


def test_culprits_names_failed_dead_silent_and_stalled_ranks_and_spares_waiting_or_done_ones():
    import socket

    host = socket.gethostname()
    beats = {0: _beat(0, watchdog.WAITING, host=host),
             1: _beat(1, watchdog.FORWARD, host=host),  # alive (this process) and 20 s in the same operation
             2: _beat(2, watchdog.OPTIMIZER, pid=_dead_pid(), host=host),
             3: _beat(3, watchdog.FAILED, error="ValueError: bad batch"),
             4: _beat(4, watchdog.DONE),
             5: {**_beat(5, watchdog.SAVE, host="elsewhere"), "time": time.time() - 60}}
    blamed = watchdog.culprits(beats, me=0, world_size=7, host=host)
    assert blamed[0] == "rank 3 failed at step 3 (ValueError: bad batch)"
    assert blamed[1].startswith("rank 2 died at step 3 in optimizer step (pid ")
    assert blamed[2].startswith("rank 5 stopped responding at step 3 in save checkpoint (no heartbeat for 60 s")
    assert blamed[3].startswith("rank 1 stalled at step 3 in forward/backward (no progress for 20.")
    assert blamed[4] == "rank 6 (no heartbeat)"
    assert len(blamed) == 5  # rank 0 is me, rank 4 finished


def _heartbeat(tmp_path: Path, rank: int = 0, world_size: int = 2, **kwargs) -> watchdog.Heartbeat:
    hb = watchdog.Heartbeat(tmp_path / ".heartbeat", rank, world_size, local_rank=rank, local_world_size=world_size,
                            launch="L", run_dir=tmp_path, timeout_s=20, **kwargs)
    hb.folder.mkdir(parents=True, exist_ok=True)
    return hb


def test_heartbeat_file_is_written_by_the_thread_at_most_once_per_interval(tmp_path, monkeypatch):
    writes = []
    real = watchdog._write_json
    monkeypatch.setattr(watchdog, "_write_json", lambda path, data: (writes.append(data), real(path, data)))
    hb = _heartbeat(tmp_path, interval=0.5)
    monkeypatch.setattr(hb, "check", lambda: None)
    hb.start()
    try:
        for step in range(1, 200):  # many operations in a short time: memory only
            hb.enter(step, watchdog.FORWARD)
            hb.enter(step, watchdog.OPTIMIZER)
        hb.enter(200, watchdog.SAVE)
        time.sleep(1.3)
    finally:
        hb.stop()
    assert 2 <= len(writes) <= 5, len(writes)  # the first write, ~2 thread writes in 1.3 s, the final one
    assert writes[-2]["step"] == 200 and writes[-2]["op"] == watchdog.SAVE  # the thread wrote the latest state
    final = json.loads(hb.path.read_text())
    assert final["op"] == watchdog.DONE and final["rank"] == 0 and final["pid"] == os.getpid()
    assert not list(hb.folder.glob(".*tmp"))  # atomic: no temporary file left behind


def test_a_rank_leaves_when_another_rank_published_the_abort(tmp_path, monkeypatch):
    hb = _heartbeat(tmp_path, rank=1)
    exits = []
    monkeypatch.setattr(hb, "_exit", exits.append)
    hb.check()
    assert exits == []
    other = _heartbeat(tmp_path, rank=0)
    assert other.abort("watchdog: rank 1 stalled ...") == "watchdog: rank 1 stalled ..."
    assert other.abort("a second opinion") == "watchdog: rank 1 stalled ..."  # the first published message wins
    hb.check()
    assert exits == ["rank 1: stopped by the watchdog. watchdog: rank 1 stalled ..."]


def test_a_dead_peer_on_this_host_stops_the_launch_at_once_but_a_finished_one_does_not(tmp_path, monkeypatch):
    import socket

    hb = _heartbeat(tmp_path, rank=0)
    exits = []
    monkeypatch.setattr(hb, "_exit", exits.append)
    peer = hb.folder / "rank-1.json"
    for op in (watchdog.DONE, watchdog.INTERRUPTED):  # finished, or stopped by Ctrl-C like every rank
        peer.write_text(json.dumps(_beat(1, op, pid=_dead_pid(), host=socket.gethostname())))
        hb.check()
    assert exits == []
    peer.write_text(json.dumps(_beat(1, watchdog.OPTIMIZER, step=7, pid=_dead_pid(), host=socket.gethostname())))
    hb.check()
    assert len(exits) == 1 and exits[0].startswith("watchdog: rank 1 died at step 7 in optimizer step (pid ")
    assert "No checkpoint was complete yet" in exits[0]
    published = json.loads(watchdog.abort_path(hb.folder, "L").read_text())
    assert published["message"] == exits[0] and published["rank"] == 0


def test_the_rank_whose_collective_times_out_names_the_stalled_rank_and_the_checkpoint(tmp_path):
    hb = _heartbeat(tmp_path, rank=0)
    (tmp_path / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-4" / "COMPLETE").write_text("ok\n")
    (tmp_path / "checkpoints" / "checkpoint-6").mkdir()  # half-written: not the resume point
    (hb.folder / "rank-1.json").write_text(json.dumps(_beat(1, watchdog.FORWARD, step=5, host=hb.host)))
    error = watchdog.collective_failure(hb, RuntimeError(
        "[/x/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation to complete"))
    assert isinstance(error, watchdog.RankFailed) and error.exit_code == 4
    message = str(error)
    assert message.startswith("watchdog: rank 1 stalled at step 5 in forward/backward (no progress for 20.")
    assert "rank 0's collective failed (distributed.timeout 20 s): Timed out waiting 20000ms" in message
    assert "--resume: it continues from checkpoint-4, the last complete checkpoint" in message
    assert json.loads(hb.path.read_text())["op"] == watchdog.WAITING


def test_a_lost_connection_waits_for_the_dying_peer_to_be_gone_and_names_it_dead(tmp_path):
    hb = _heartbeat(tmp_path, rank=1)
    dying = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])  # SIGKILLed, not yet reaped
    try:
        (hb.folder / "rank-0.json").write_text(json.dumps(_beat(0, watchdog.OPTIMIZER, step=5, pid=dying.pid,
                                                                 host=hb.host)))
        threading.Thread(target=dying.wait, daemon=True).start()
        message = str(watchdog.collective_failure(hb, RuntimeError("Read error [127.0.0.1]:1: Connection reset by peer")))
    finally:
        dying.kill()
    assert message.startswith(f"watchdog: rank 0 died at step 5 in optimizer step (pid {dying.pid} on ")


def test_the_launcher_line_adds_each_failed_rank_s_last_heartbeat_and_the_published_message(tmp_path):
    folder = tmp_path / ".heartbeat"
    folder.mkdir()
    (folder / "rank-1.json").write_text(json.dumps(_beat(1, watchdog.FORWARD, step=3)))
    (folder / "rank-0.json").write_text(json.dumps({**_beat(0, watchdog.FORWARD), "launch": "older"}))
    failures = {0: SimpleNamespace(exitcode=-15, timestamp=2), 1: SimpleNamespace(exitcode=-9, timestamp=1)}
    env = {watchdog.HEARTBEAT_ENV: str(folder), watchdog.LAUNCH_ENV: "L"}
    assert watchdog.describe_failures(failures, env) == (
        "torchrun: rank 1 killed by SIGKILL, last heartbeat at step 3 in forward/backward, rank 0 killed by SIGTERM")
    watchdog.abort_path(folder, "L").write_text(json.dumps({"rank": 0, "message": "watchdog: rank 1 died", "time": 1}))
    assert watchdog.describe_failures(failures, env).endswith("\nwatchdog: rank 1 died")
    assert watchdog.describe_failures({2: SimpleNamespace(exitcode=1, timestamp=0)}, {}) == "torchrun: rank 2 exit 1"
    (folder / "rank-0.json").write_text(json.dumps(_beat(0, watchdog.WAITING, step=3)))
    (folder / "rank-1.json").write_text(json.dumps(_beat(1, watchdog.FAILED, step=3, error="stopped by the watchdog")))
    failures = {0: SimpleNamespace(exitcode=4, timestamp=1), 1: SimpleNamespace(exitcode=-15, timestamp=2)}
    assert watchdog.describe_failures(failures, env).startswith(
        "torchrun: rank 0 exit 4 (its collective failed, step 3), rank 1 killed by SIGTERM (stopped by the watchdog, "
        "step 3)\n")


def test_launch_env_gives_every_launch_its_own_id_and_an_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one, two = watchdog.launch_env("runs/x"), watchdog.launch_env("runs/x")
    assert one[watchdog.HEARTBEAT_ENV] == str(tmp_path / "runs" / "x" / ".heartbeat")
    assert one[watchdog.LAUNCH_ENV] != two[watchdog.LAUNCH_ENV]
    assert watchdog.heartbeat_dir("runs/y", env={}) == tmp_path / "runs" / "y" / ".heartbeat"
    assert watchdog.launch_id({"TORCHELASTIC_RUN_ID": "abc", "MASTER_PORT": "29500"}) == "abc-29500-0"


# ----------------------------------------------------------------------------- slow: two real ranks, one faulty

LAUNCH_TIMEOUT = 600  # seconds: a launch that takes longer is a hang, not a slow machine
STEPS = 8
TIMEOUT_S = 20  # distributed.timeout in these runs
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_chat_items(tmp_path_factory.mktemp("data"), 96, seed=1) / "train.jsonl"


def _config(out: Path, data_path: Path, strategy: dict | None = None) -> Path:
    raw = {
        "run_name": out.name, "output_dir": str(out), "seed": 11, "stage": "sft",
        "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512},
                  "device": "cpu"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": [str(data_path)], "max_length": 128},
        "train": {"max_steps": STEPS, "batch_size": 2, "lr": 3e-3, "logging_steps": 1, "save_steps": 2,
                  "save_total_limit": 10, "report_to": ["none"]},
        "distributed": {"timeout": TIMEOUT_S, **(strategy or {})},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _launch(config: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop(watchdog.FAULT_ENV, None)
    if fault:
        env[watchdog.FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "tuneforge", "train", str(config), "--nproc", "2", *extra],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env)


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _fault_time(run_dir: Path, rank: int) -> float:
    return float(json.loads((run_dir / ".heartbeat" / f"rank-{rank}.json").read_text())["fault_at"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_file) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref"
    done = _launch(_config(out, data_file))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / ".heartbeat" / "rank-1.json").read_text())["op"] == watchdog.DONE
    return out


def _check_resume(out: Path, config: Path, uninterrupted: Path) -> None:
    resumed = _launch(config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: continuing from {out / 'checkpoints' / 'checkpoint-4'}" in resumed.stdout
    # The checkpoint holds both ranks' RNG states, the optimizer and the scheduler: the same run, to float noise
    # (the bound of tests/test_distributed_runs.py's kill-and-resume test).
    assert _max_diff(_adapter(out), _adapter(uninterrupted)) < 1e-6


@pytest.mark.slow
def test_a_stalled_rank_stops_every_rank_within_the_timeout_naming_it_then_resume_equals_uninterrupted(
        uninterrupted, data_file, tmp_path):
    out = tmp_path / "stalled"
    config = _config(out, data_file)
    started = time.monotonic()
    done = _launch(config, fault="stall:rank=1:step=5")
    ended, wall = time.time(), time.monotonic() - started
    assert done.returncode == watchdog.EXIT_CODE, done.stderr[-3000:]
    assert "error: watchdog: rank 1 stalled at step 5 in forward/backward (no progress for" in done.stderr, \
        done.stderr[-1500:]
    assert "rank 1: stopped by the watchdog." in done.stderr  # the stalled rank itself left, with the message
    assert "Run the same command with --resume: it continues from checkpoint-4" in done.stderr
    abort_after = ended - _fault_time(out, 1)
    MEASURED["stall: launcher returned after the stall (s)"] = abort_after
    print(f"stall: the launcher returned {abort_after:.1f} s after rank 1 stalled (timeout {TIMEOUT_S} s); "
          f"launch wall time {wall:.0f} s")
    assert TIMEOUT_S - 1 <= abort_after <= TIMEOUT_S + 10  # the collective timeout fired, and nothing hung after
    assert not (out / "final").exists()
    assert (out / "checkpoints" / "checkpoint-4" / "COMPLETE").is_file()
    _check_resume(out, config, uninterrupted)


@pytest.mark.slow
def test_a_killed_rank_0_stops_the_other_rank_at_once_naming_it_then_resume_equals_uninterrupted(
        uninterrupted, data_file, tmp_path):
    out = tmp_path / "killed"
    config = _config(out, data_file)
    done = _launch(config, fault="kill:rank=0:step=5:op=optimizer")
    ended = time.time()
    assert done.returncode == watchdog.EXIT_CODE, done.stderr[-3000:]
    assert "watchdog: rank 0 died at step 5 in optimizer step (pid " in done.stderr, done.stderr[-1500:]
    assert "torchrun: rank 0 killed by SIGKILL, last heartbeat at step 5 in optimizer step" in done.stderr
    abort_after = ended - _fault_time(out, 0)
    MEASURED["kill: launcher returned after the kill (s)"] = abort_after
    print(f"kill: the launcher returned {abort_after:.1f} s after rank 0 was killed (timeout {TIMEOUT_S} s)")
    assert abort_after <= TIMEOUT_S + 10
    assert not (out / "final").exists()
    _check_resume(out, config, uninterrupted)


# Sharded engines: the same stall under FSDP (accelerate's plugin) and DeepSpeed ZeRO-2 (its CPU accelerator, gloo).
SHARDED = {"fsdp": {"strategy": "fsdp"},
           "deepspeed": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}}}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(SHARDED))
def test_a_stalled_rank_under_a_sharded_engine_stops_every_rank_within_the_timeout_then_resume_equals_uninterrupted(
        engine, data_file, tmp_path):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")  # the optional extra `distributed`
    reference = tmp_path / "ref"
    done = _launch(_config(reference, data_file, SHARDED[engine]))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "stalled"
    config = _config(out, data_file, SHARDED[engine])
    done = _launch(config, fault="stall:rank=1:step=5")
    ended = time.time()
    assert done.returncode == watchdog.EXIT_CODE, done.stderr[-3000:]
    assert "error: watchdog: rank 1 stalled at step 5 in forward/backward (no progress for" in done.stderr, \
        done.stderr[-1500:]
    assert "rank 1: stopped by the watchdog." in done.stderr
    abort_after = ended - _fault_time(out, 1)
    MEASURED[f"{engine} stall: launcher returned after the stall (s)"] = abort_after
    print(f"{engine} stall: the launcher returned {abort_after:.1f} s after rank 1 stalled (timeout {TIMEOUT_S} s)")
    assert TIMEOUT_S - 1 <= abort_after <= TIMEOUT_S + 10
    assert not (out / "final").exists()
    assert (out / "checkpoints" / "checkpoint-4" / "COMPLETE").is_file()
    _check_resume(out, config, reference)
