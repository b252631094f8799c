"""Training on several processes: the launcher, who is who (torchrun's and SLURM's environment), the engines' configs.

One run config trains on one process or many (docs/distributed.md):

* :func:`launch` turns ``tuneforge train run.yaml --nproc N [--nnodes --node-rank --master-addr --master-port]``
  into ``python -m torch.distributed.run ... -m tuneforge train run.yaml``; under SLURM the node count, node rank
  and master address come from SLURM's environment when the flags are not given.
* :func:`world` reads the rank and world size torchrun (or ``accelerate launch``) gives each process.
* :func:`trainer_arguments` turns the ``distributed:`` section into the Trainer's own options: DDP's backend and
  timeout, accelerate's FSDP plugin (``fsdp_config``), or a DeepSpeed JSON (also written to ``<run>/deepspeed.json``).
* :func:`check_strategy` refuses, before anything starts, a strategy the method cannot take.
* Rank 0 alone checks the run directory, takes its lock, tokenises the data and writes every file; it hands the
  result (:class:`Handoff`: resolved config, tokenised rows, resume point) to the other ranks through a file beside
  the run and a key in torchrun's store (:func:`send_setup` / :func:`receive_setup`). The other ranks wait for it
  without a timeout — tokenising a large corpus may take hours — and stop with rank 0's error if it fails.

Light module: torch is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from tuneforge.console import say
from tuneforge.errors import UserError
from tuneforge.train import watchdog

#: environment variable naming a file where rank 0 leaves its exit code for the launcher
STATUS_ENV = "TUNEFORGE_LAUNCH_STATUS"
#: the store key (per torchrun attempt) under which rank 0 publishes its setup
_SETUP_KEY = "tuneforge/setup"
#: torchrun's default port when neither --master-port nor SLURM gives one
DEFAULT_PORT = 29500
DEEPSPEED_JSON = "deepspeed.json"
WORLD_FILE = "tuneforge_world.json"  # in each checkpoint: the world size and strategy that wrote it


# ----------------------------------------------------------------------------- who is who


@dataclass(frozen=True)
class World:
    """This process's place in the job (from torchrun's environment; one process when it is absent)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world(env: dict | None = None) -> World:
    """The rank and world size of this process, as torchrun / ``accelerate launch`` set them (``RANK`` etc.).

    Raises:
        UserError: ``WORLD_SIZE`` > 1 without ``RANK`` (a launcher that did not set both).
    """
    env = os.environ if env is None else env
    size = int(env.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    if "RANK" not in env:
        raise UserError("WORLD_SIZE is set but RANK is not: launch through `tuneforge train --nproc N`, torchrun or "
                        "accelerate launch")
    return World(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)), world_size=size,
                 local_world_size=int(env.get("LOCAL_WORLD_SIZE", size)))


# ----------------------------------------------------------------------------- launching


@dataclass(frozen=True)
class LaunchPlan:
    """What ``torchrun`` is asked to start on this node."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    from_slurm: tuple[str, ...] = ()  # the settings read from SLURM's environment

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def expand_hostlist(spec: str) -> list[str]:
    """SLURM's compressed host list → host names (``gpu[01-03,07],login`` → gpu01 gpu02 gpu03 gpu07 login)."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", spec):
        if plain:
            hosts.append(plain.strip())
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                hosts.extend(f"{prefix}{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part)
    return [h for h in hosts if h]


def plan_launch(nproc: int | None, nnodes: int | None = None, node_rank: int | None = None,
                master_addr: str | None = None, master_port: int | None = None,
                env: dict | None = None) -> LaunchPlan:
    """The launch from the flags, with what is missing read from SLURM's environment (``SLURM_JOB_ID`` set).

    SLURM gives ``SLURM_NNODES``, ``SLURM_NODEID`` and ``SLURM_JOB_NODELIST`` (its first host is the master); the
    port is derived from the job id so that two jobs sharing a node do not collide.

    Raises:
        UserError: a value out of range, or several nodes without a master address.
    """
    env = os.environ if env is None else env
    read: list[str] = []
    if "SLURM_JOB_ID" in env:
        if nnodes is None and env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES")):
            nnodes = int(env.get("SLURM_NNODES") or env["SLURM_JOB_NUM_NODES"])
            read.append(f"nnodes={nnodes}")
        if node_rank is None and env.get("SLURM_NODEID"):
            node_rank = int(env["SLURM_NODEID"])
            read.append(f"node_rank={node_rank}")
        if master_addr is None and env.get("SLURM_JOB_NODELIST") and (nnodes or 1) > 1:
            master_addr = expand_hostlist(env["SLURM_JOB_NODELIST"])[0]
            read.append(f"master_addr={master_addr}")
        if master_port is None and (nnodes or 1) > 1:
            master_port = 20000 + int(re.sub(r"\D", "", env["SLURM_JOB_ID"]) or 0) % 20000
            read.append(f"master_port={master_port}")
    nnodes = nnodes or 1
    node_rank = node_rank or 0
    if nproc is None:
        nproc = 1
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: expected at least 1 process per node")
    if nnodes < 1:
        raise UserError(f"--nnodes {nnodes}: expected at least 1")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank {node_rank}: expected 0..{nnodes - 1} (--nnodes {nnodes})")
    if nnodes > 1 and not master_addr:
        raise UserError(f"--nnodes {nnodes}: every node needs --master-addr (the host name or IP address of node "
                        "0, reachable from the others) and the same --master-port")
    if master_port is not None and not 0 < master_port < 65536:
        raise UserError(f"--master-port {master_port}: expected a TCP port 1..65535")
    return LaunchPlan(nproc, nnodes, node_rank, master_addr, master_port, tuple(read))


def check_devices(nproc: int, device: str) -> None:
    """On a GPU machine, one process per GPU: refuse more processes than GPUs.

    Raises:
        UserError: ``--nproc`` larger than the GPUs this node has (CPU runs may start any number of processes).
    """
    if device == "cpu" or device.startswith("cpu"):
        return
    import torch

    if not torch.cuda.is_available():
        return  # CPU training (gloo): processes are not tied to devices
    count = torch.cuda.device_count()
    if nproc > count:
        raise UserError(f"--nproc {nproc}: this node has {count} GPU(s) (CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most one process per GPU")


def check_master(addr: str, port: int, node_rank: int, timeout_s: float, sleep=time.sleep) -> None:
    """Refuse a master address that does not resolve, and (on nodes > 0) one that does not answer in time.

    Node 0 hosts the rendezvous; the other nodes poll it until ``timeout_s`` (node 0 may start a little later).

    Raises:
        UserError: naming the address, how long we waited, and what to check.
    """
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"--master-addr {addr!r} does not resolve ({exc.strerror}); give node 0's host name or IP "
                        "address as the other nodes see it") from None
    if node_rank == 0:
        return
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        for family, kind, proto, _, sockaddr in infos:
            try:
                with socket.socket(family, kind, proto) as sock:
                    sock.settimeout(min(5.0, max(0.1, deadline - time.monotonic())))
                    sock.connect(sockaddr)
                    return
            except OSError as exc:
                last = exc.strerror or type(exc).__name__
        if time.monotonic() >= deadline:
            raise UserError(
                f"cannot reach the master {addr}:{port} from node {node_rank} within {timeout_s:g} s (last error: "
                f"{last}); check that node 0 was started with the same --master-addr/--master-port, that the "
                "address is node 0's as this node sees it, and that no firewall blocks the port "
                "(distributed.connect_timeout_s sets the wait)")
        sleep(1.0)


def torchrun_command(plan: LaunchPlan, train_argv: list[str], shutdown_timeout_s: int) -> list[str]:
    """torchrun (``torch.distributed.run``, through :func:`_torchrun_main`) on ``-m tuneforge train <train_argv>``."""
    cmd = [sys.executable, "-m", "tuneforge.train.distributed", f"--nproc-per-node={plan.nproc}",
           f"--nnodes={plan.nnodes}", f"--node-rank={plan.node_rank}", "--max-restarts=0",
           f"--shutdown-timeout={shutdown_timeout_s}"]
    if plan.nnodes == 1 and plan.master_port is None:
        cmd.append("--standalone")  # a free local port, no rendezvous to configure
    else:
        cmd += [f"--master-addr={plan.master_addr or '127.0.0.1'}",
                f"--master-port={plan.master_port or DEFAULT_PORT}"]
    return [*cmd, "-m", "tuneforge", "train", *train_argv]


def launch(plan: LaunchPlan, train_argv: list[str], cfg: Any) -> int:
    """Check the launch, start torchrun, wait for it and return rank 0's exit code.

    ``train_argv`` is the ``tuneforge train`` command line without the launch flags. SIGTERM and SIGINT are passed
    on to torchrun, which passes them to every rank (each saves a checkpoint at its next step and stops).

    Raises:
        UserError: more processes than GPUs, a strategy the method cannot take, an unreachable master.
    """
    from tuneforge.methods import get_method

    dist = cfg.distributed
    check_devices(plan.nproc, cfg.model.device)
    if cfg.method.name != "auto":
        check_strategy(cfg, get_method(cfg.method.name), plan.world_size)
    if plan.master_addr and plan.nnodes > 1:
        check_master(plan.master_addr, plan.master_port or DEFAULT_PORT, plan.node_rank, dist.connect_timeout_s)
    if plan.from_slurm:
        say("launch: from SLURM's environment: " + ", ".join(plan.from_slurm))
    say(f"launch: {plan.nproc} process(es) on node {plan.node_rank} of {plan.nnodes} "
         f"(world size {plan.world_size}, strategy {dist.strategy})")
    status = Path(_status_file())
    env = {**os.environ, STATUS_ENV: str(status), **watchdog.launch_env(cfg.output_dir or ".")}  # heartbeats
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, stated so it does not warn
    cmd = torchrun_command(plan, train_argv, dist.shutdown_timeout_s)
    proc = subprocess.Popen(cmd, env=env)
    forwarded = {}

    def forward(signum, frame):
        proc.send_signal(signum)

    # SLURM signals every process of the job step itself (torchrun and the ranks); passing it on as well would
    # give torchrun a second signal in the middle of its graceful shutdown.
    signals = (signal.SIGINT,) if "SLURM_JOB_ID" in os.environ else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        forwarded[sig] = signal.signal(sig, forward)
    try:
        code = proc.wait()
    finally:
        for sig, previous in forwarded.items():
            signal.signal(sig, previous)
    rank0 = _read_status(status)
    if rank0 is not None:
        return rank0  # the code rank 0 chose (2 user error, 3 stopped, 75 interrupted, 0 done)
    return code


def _status_file() -> str:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="tuneforge-launch-", suffix=".status")
    os.close(fd)
    os.unlink(path)
    return path


def _read_status(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    finally:
        path.unlink(missing_ok=True)


def report_status(code: int) -> None:
    """Leave this rank's exit code for the launcher (when ``tuneforge train --nproc`` started us).

    Rank 0's code is the run's; another rank's failure is kept only when rank 0 has said nothing (it may hang in
    a collective and be killed by torchrun).
    """
    path = os.environ.get(STATUS_ENV)
    if not path:
        return
    if world().is_main:
        Path(path).write_text(f"{code}\n")
    elif code:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{code}\n")


# ----------------------------------------------------------------------------- strategies


def check_strategy(cfg: Any, method: Any, world_size: int) -> None:
    """Refuse a strategy the method or the machine cannot take, with the reason and what to use instead.

    Decided by the method's declared capabilities (``Method.capabilities``), never by its name.

    Raises:
        UserError: a method that is not ``shardable`` under FSDP/DeepSpeed (it builds its own optimizer, like
            GaLore and LoRA+; it changes the base, like PiSSA/OLoRA; or it reads full gradients, like AdaLoRA);
            a ``quantized_base`` method under DeepSpeed ZeRO-3 or FSDP; DeepSpeed not installed.
    """
    strategy = cfg.distributed.strategy
    if world_size <= 1:
        return
    for key in ("retention", "distill"):
        if getattr(cfg.train, key, None) is not None:
            raise UserError(f"train.{key} on {world_size} processes: its extra loss term is built on rank 0 only "
                            "so far; train it on one process (leave out --nproc)")
    if strategy == "ddp":
        return
    name = cfg.method.name
    engine = "FSDP" if strategy == "fsdp" else f"DeepSpeed ZeRO-{cfg.distributed.deepspeed.zero_stage}"
    caps = method.capabilities(cfg.method)
    if not caps.shardable:
        raise _unshardable(name, caps, strategy, engine)
    if caps.quantized_base:
        _check_quantized_base(name, strategy, cfg.distributed.deepspeed.zero_stage)
    if strategy == "deepspeed":
        _require_deepspeed()


def _unshardable(name: str, caps: Any, strategy: str, engine: str) -> UserError:
    """The refusal of a method that is not ``shardable``, with the reason its capabilities give."""
    if caps.owns_optimizer:
        return UserError(
            f"method {name!r} with distributed.strategy {strategy}: the method builds its own optimizer over whole, "
            f"unsharded parameters and gradients, and {engine} shards them (the Trainer does not let a ready-made "
            "optimizer wrap sharded parameters); use strategy: ddp, or another method")
    if caps.changes_base:
        return UserError(
            f"method {name!r} (a base-changing initialisation) with distributed.strategy {strategy}: the final "
            "adapter is converted for the original base from the unsharded model, which this engine does not "
            "keep; use strategy: ddp")
    return UserError(
        f"method {name!r} with distributed.strategy {strategy}: its training callback reads every adapter's full "
        f"weights and gradients, which {engine} shards; use strategy: ddp")


def _check_quantized_base(name: str, strategy: str, zero_stage: int) -> None:
    """A method on a quantized base: DeepSpeed ZeRO-2 or DDP only."""
    if strategy == "deepspeed" and zero_stage == 3:
        raise UserError(
            f"method {name!r} with DeepSpeed ZeRO-3: ZeRO-3 partitions every parameter, and bitsandbytes' 4-bit "
            "weights can only be partitioned when stored in a float dtype (bnb_4bit_quant_storage), which "
            "tuneforge's qlora does not set; use zero_stage: 2 (the frozen 4-bit base is small) or strategy: ddp")
    if strategy == "fsdp":
        raise UserError(
            f"method {name!r} with FSDP: FSDP needs the 4-bit weights stored in the compute dtype "
            "(bnb_4bit_quant_storage) and CUDA; tuneforge does not set that up: use strategy: ddp, or "
            "deepspeed with zero_stage: 2")


def _require_deepspeed() -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("distributed.strategy deepspeed needs the deepspeed package: pip install 'tuneforge[distributed]' "
                        "(or pip install deepspeed)")


def deepspeed_config(options: Any) -> dict:
    """The DeepSpeed JSON for ``distributed.deepspeed``; ``"auto"`` values are filled in by the Trainer.

    Batch sizes, accumulation, clipping and precision come from the run's ``train:`` section through the Trainer
    (its ``"auto"`` convention), so the JSON never disagrees with the config.
    """
    zero: dict[str, Any] = {"stage": options.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # ZeRO-Offload steps on the CPU with DeepSpeed's own CPU Adam, built from this section.
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                            "weight_decay": "auto"}}
    if options.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if options.zero_stage == 3:
        # final/ must be an ordinary model: gather the partitioned weights when the Trainer saves.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def fsdp_config(options: Any) -> dict:
    """``TrainingArguments.fsdp_config`` for ``distributed.fsdp`` (accelerate's FSDP plugin reads it).

    Checkpoints use full (unsharded) state dicts, so a checkpoint resumes on any number of processes and
    ``final/`` is an ordinary model directory.
    """
    config: dict[str, Any] = {
        "version": options.version,
        "cpu_offload": options.cpu_offload,
        # TRANSFORMER_BASED_WRAP without class names wraps the model's _no_split_modules (its decoder layers).
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP" if options.auto_wrap else "NO_WRAP",
        "activation_checkpointing": options.activation_checkpointing,
        "state_dict_type": "FULL_STATE_DICT",
    }
    if options.version == 2:
        config["reshard_after_forward"] = options.sharding == "full_shard"
    else:
        config["reshard_after_forward"] = options.sharding
    return config


def trainer_arguments(cfg: Any, run_dir: Path, world_: World, device: str) -> dict:
    """Extra ``TrainingArguments`` for this world: backend and timeout, FSDP or DeepSpeed (none on one process)."""
    if not world_.distributed:
        return {}
    dist = cfg.distributed
    backend = dist.backend if dist.backend != "auto" else ("gloo" if device == "cpu" else "nccl")
    args: dict[str, Any] = {"ddp_backend": backend, "ddp_timeout": int(dist.timeout)}  # + watchdog.py on CPU
    if dist.strategy == "ddp":
        # Frozen base weights of adapter methods get no gradient; DDP must not wait for them.
        args["ddp_find_unused_parameters"] = False
    elif dist.strategy == "fsdp":
        args["fsdp"] = True
        args["fsdp_config"] = fsdp_config(dist.fsdp)
    else:
        args["deepspeed"] = deepspeed_config(dist.deepspeed)
    return args


def write_engine_config(cfg: Any, run_dir: Path) -> Path | None:
    """Rank 0: ``<run>/deepspeed.json`` for a DeepSpeed run (the exact JSON the Trainer is given)."""
    if cfg.distributed.strategy != "deepspeed":
        return None
    from tuneforge.utils import atomic_write_json

    path = Path(run_dir) / DEEPSPEED_JSON
    atomic_write_json(path, deepspeed_config(cfg.distributed.deepspeed))
    return path


# ----------------------------------------------------------------------------- resume rules


def checkpoint_world(checkpoint: Path) -> dict | None:
    """``{"world_size", "strategy"}`` a checkpoint was written with (None for single-process checkpoints of old)."""
    try:
        return json.loads((Path(checkpoint) / WORLD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_checkpoint_world(checkpoint: Path, world_size: int, strategy: str) -> None:
    from tuneforge.utils import atomic_write_json

    atomic_write_json(Path(checkpoint) / WORLD_FILE, {"world_size": world_size, "strategy": strategy})


def check_resume_world(checkpoint: Path, world_size: int, strategy: str) -> None:
    """Resuming on another world size or strategy: allowed where the engine's checkpoint allows it (what changes
    is said with :func:`tuneforge.console.say`).

    DDP and FSDP checkpoints hold the full model and optimizer state (FSDP: full state dicts), so any world size
    can continue them — the global batch (per-process batch x processes x accumulation) changes with it and the
    data order differs from an uninterrupted run. A DeepSpeed ZeRO checkpoint holds one optimizer partition per
    rank and resumes only on the world size that wrote it. A checkpoint continues only on the engine that wrote it.

    Raises:
        UserError: another strategy, or a DeepSpeed checkpoint on another world size.
    """
    saved = checkpoint_world(checkpoint) or {"world_size": 1, "strategy": "ddp"}
    old_size, old_strategy = int(saved.get("world_size", 1)), saved.get("strategy", "ddp")
    if world_size <= 1 and old_size <= 1:
        return
    if old_strategy != strategy and max(old_size, world_size) > 1:
        raise UserError(
            f"--resume: {checkpoint.name} was written by strategy {old_strategy} (world size {old_size}); its "
            f"files are that engine's format, so continue it with distributed.strategy: {old_strategy}")
    if old_size == world_size:
        return
    if strategy == "deepspeed":
        raise UserError(
            f"--resume: {checkpoint.name} was written by {old_size} DeepSpeed ranks and this launch has "
            f"{world_size}; ZeRO keeps one optimizer partition per rank, so resume with {old_size} processes "
            "in total (--nproc x --nnodes)")
    from tuneforge.console import say

    say(f"resume: world size {old_size} → {world_size}: the checkpoint holds the full state, so training "
        "continues, but the global batch changes with the number of processes (batch_size x processes x "
        "grad_accum) and the data order differs from an uninterrupted run")


# ----------------------------------------------------------------------------- rank 0 → other ranks


@dataclass
class Handoff:
    """What rank 0 built and the other ranks reuse."""

    config: dict  # the resolved run config (method auto already chosen)
    bundle: Any  # the tokenised data (train/eval rows, stats)
    packing: bool
    resume_from: str | None
    tokenizer_dir: str | None  # from-config models: the tokenizer rank 0 trained


class SetupFailed(UserError):
    """Rank 0 failed before training; the other ranks stop with its message and exit code."""


def cache_dir(run_dir: Path) -> Path:
    """Hidden sibling of the run holding the handoff of the current launch (rank 0 removes it when done)."""
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f".{run_dir.name}.dist-cache")


def _store(timeout: timedelta):
    """A client of torchrun's store (the rendezvous every rank already talks to)."""
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise UserError("this process was started with a world size > 1 but not by torchrun's agent: launch "
                        "with `tuneforge train --nproc N`, torchrun or accelerate launch")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout, wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"/tuneforge/attempt_{attempt}", store)


def start_cache(run_dir: Path) -> Path:
    """Rank 0: an empty cache directory for this launch (old launches' leftovers removed; we hold the run lock)."""
    folder = cache_dir(run_dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def send_setup(handoff: Handoff, run_dir: Path) -> None:
    """Rank 0: write the handoff, then tell the other ranks where it is."""
    folder = cache_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"setup-{uuid.uuid4().hex[:8]}.pkl"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        pickle.dump(handoff, handle, protocol=pickle.HIGHEST_PROTOCOL)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _store(timedelta(minutes=5)).set(_SETUP_KEY, json.dumps({"path": str(path)}))


def send_failure(message: str, exit_code: int) -> None:
    """Rank 0: the setup failed; the other ranks stop with this message."""
    try:
        _store(timedelta(seconds=30)).set(_SETUP_KEY, json.dumps({"error": message, "exit_code": exit_code}))
    except Exception:  # noqa: BLE001 - torchrun stops the other ranks anyway when rank 0 exits
        pass


def receive_setup() -> Handoff:
    """Other ranks: wait for rank 0's setup — without a timeout — and load it, saying every ten minutes that this
    rank is still waiting (:func:`tuneforge.console.say`).

    Raises:
        SetupFailed: rank 0 failed (its message and exit code).
    """
    store = _store(timedelta(minutes=5))
    waited = 0
    while True:
        try:
            store.wait([_SETUP_KEY], timedelta(seconds=60))
            break
        except Exception as exc:  # noqa: BLE001 - torch raises DistStoreError/RuntimeError on a wait timeout
            if "timeout" not in str(exc).lower() and "timed out" not in str(exc).lower():
                raise
            waited += 60
            if waited % 600 == 0:
                from tuneforge.console import say

                say(f"rank {world().rank}: still waiting for rank 0 to prepare the data ({waited // 60} min)")
    message = json.loads(store.get(_SETUP_KEY).decode("utf-8"))
    if "error" in message:
        error = SetupFailed(f"rank 0 stopped before training: {message['error']}")
        error.exit_code = int(message.get("exit_code", 2))
        raise error
    with open(message["path"], "rb") as handle:
        return pickle.load(handle)  # noqa: S301 - written by rank 0 of this launch into the run's own cache


def finish_cache(run_dir: Path) -> None:
    """Rank 0, after training: the handoff is no longer needed."""
    shutil.rmtree(cache_dir(run_dir), ignore_errors=True)


# ----------------------------------------------------------------------------- collectives during training


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (an all-reduce; plain ``flag`` on one process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- torchrun, quietly


def _torchrun_main(argv: list[str]) -> int:
    """``torch.distributed.run`` with one line instead of its traceback when a rank fails (ranks print their own)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as exc:
        print(watchdog.describe_failures(exc.failures), file=sys.stderr)  # + each rank's last heartbeat
        return 1
    except SignalException as exc:  # the ranks got the signal too and have stopped (after a checkpoint)
        print(f"torchrun: stopped by signal {int(exc.sigval)}", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun_main(sys.argv[1:]))
