"""Distributed training without starting processes: launch plans, SLURM, engine configs, strategy and resume rules.

The runs on two processes (gloo) are in tests/test_distributed_runs.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tuneforge.cli import main
from tuneforge.config import dump_config, validate_config
from tuneforge.errors import UserError
from tuneforge.train import distributed


def _raw(tmp_path: Path, **sections) -> dict:
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    raw = {"run_name": "r", "output_dir": str(tmp_path / "runs" / "r"),
           "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512},
                     "device": "cpu"},
           "method": {"name": "lora", "r": 4}, "data": {"train": [str(data)]}}
    raw.update(sections)
    return raw


def _config_file(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path, **sections)))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- config


def test_distributed_section_defaults_and_round_trip(tmp_path):
    cfg = validate_config(_raw(tmp_path, distributed={"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}))
    assert cfg.distributed.deepspeed.zero_stage == 3
    again = validate_config(yaml.safe_load(dump_config(cfg)))  # the run's config.yaml validates again
    assert again.distributed == cfg.distributed
    assert validate_config(_raw(tmp_path)).distributed.strategy == "ddp"


@pytest.mark.parametrize("section, message", [
    ({"strategy": "ddp", "fsdp": {"cpu_offload": True}}, "strategy: fsdp"),
    ({"strategy": "fsdp", "deepspeed": {"zero_stage": 3}}, "strategy: deepspeed"),
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 2, "offload_parameters": True}}, "zero_stage: 3"),
    ({"strategy": "fsdp", "fsdp": {"sharding": "hybrid_shard"}}, "version: 1"),
    ({"strategy": "megatron"}, "strategy"),
    ({"strategy": "fsdp", "fsdp": {"shard": "full"}}, "shard"),
])
def test_distributed_section_refuses_mismatched_options(tmp_path, section, message):
    with pytest.raises(UserError, match=message):
        validate_config(_raw(tmp_path, distributed=section))


# ----------------------------------------------------------------------------- launch plan, SLURM


@pytest.mark.parametrize("spec, hosts", [
    ("node01", ["node01"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[8-10],login", ["a8", "a9", "a10", "login"]),
    ("x[1,3],y[09-10]", ["x1", "x3", "y09", "y10"]),
])
def test_slurm_hostlist_expands(spec, hosts):
    assert distributed.expand_hostlist(spec) == hosts


def test_launch_plan_reads_slurm_and_flags_win():
    env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    plan = distributed.plan_launch(4, env=env)
    assert (plan.nproc, plan.nnodes, plan.node_rank, plan.master_addr) == (4, 2, 1, "gpu07")
    assert plan.master_port == 20000 + 4242 % 20000 and plan.world_size == 8
    assert "master_addr=gpu07" in plan.from_slurm
    flagged = distributed.plan_launch(2, node_rank=0, master_addr="10.0.0.5", master_port=29400, env=env)
    assert (flagged.node_rank, flagged.master_addr, flagged.master_port) == (0, "10.0.0.5", 29400)
    assert distributed.plan_launch(2, env={}).nnodes == 1  # no SLURM: one node


@pytest.mark.parametrize("kwargs, message", [
    ({"nproc": 0}, "--nproc 0"),
    ({"nproc": 2, "nnodes": 2, "node_rank": 2, "master_addr": "h"}, "--node-rank 2"),
    ({"nproc": 2, "nnodes": 2, "node_rank": 1}, "--master-addr"),
    ({"nproc": 2, "master_port": 70000}, "--master-port 70000"),
])
def test_launch_plan_refuses_bad_values(kwargs, message):
    with pytest.raises(UserError, match=message):
        distributed.plan_launch(env={}, **kwargs)


def test_torchrun_command_single_node_and_multi_node():
    single = distributed.torchrun_command(distributed.LaunchPlan(2), ["run.yaml", "--resume"], 300)
    assert "--standalone" in single and "--nproc-per-node=2" in single and "--max-restarts=0" in single
    assert single[-5:] == ["-m", "tuneforge", "train", "run.yaml", "--resume"]
    multi = distributed.torchrun_command(distributed.LaunchPlan(8, 2, 1, "gpu07", 29400), ["run.yaml"], 60)
    assert "--standalone" not in multi
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=gpu07", "--master-port=29400",
            "--shutdown-timeout=60"} <= set(multi)


def test_world_is_read_from_torchrun_environment():
    assert distributed.world({}) == distributed.World()
    me = distributed.world({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (me.rank, me.local_rank, me.world_size, me.is_main, me.distributed) == (3, 1, 4, False, True)
    with pytest.raises(UserError, match="RANK"):
        distributed.world({"WORLD_SIZE": "2"})


# ----------------------------------------------------------------------------- bad input before any process starts


def test_master_that_does_not_resolve_is_refused_at_once():
    started = time.monotonic()
    with pytest.raises(UserError, match="does not resolve"):
        distributed.check_master("no-such-host.invalid", 29500, node_rank=1, timeout_s=60)
    assert time.monotonic() - started < 30


def test_unreachable_master_times_out_with_a_clear_message():
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(UserError, match=rf"cannot reach the master 127\.0\.0\.1:{port} from node 1 within 2 s"):
        distributed.check_master("127.0.0.1", port, node_rank=1, timeout_s=2, sleep=lambda s: time.sleep(0.2))
    assert time.monotonic() - started < 10


def test_reachable_master_passes():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        distributed.check_master("127.0.0.1", server.getsockname()[1], node_rank=1, timeout_s=5)


def test_cli_unreachable_master_exits_2_without_starting_torchrun(tmp_path, capsys):
    config = _config_file(tmp_path, distributed={"connect_timeout_s": 1})
    started = time.monotonic()
    code = main(["train", str(config), "--nproc", "1", "--nnodes", "2", "--node-rank", "1",
                 "--master-addr", "127.0.0.1", "--master-port", str(_free_port())])
    assert code == 2
    assert "cannot reach the master" in capsys.readouterr().err
    assert time.monotonic() - started < 20
    assert not (tmp_path / "runs").exists()


def test_cli_launch_flags_after_overrides_and_bad_values(tmp_path, capsys):
    config = _config_file(tmp_path)
    assert main(["train", str(config), "train.lr=1e-3", "--nproc", "2", "--nnodes", "2", "--node-rank", "5",
                 "--master-addr", "h"]) == 2
    assert "--node-rank 5" in capsys.readouterr().err
    assert main(["train", str(config), "--nproc=two"]) == 2
    assert "--nproc expects a whole number" in capsys.readouterr().err


def test_nproc_larger_than_gpus_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="--nproc 4: this node has 2 GPU"):
        distributed.check_devices(4, "auto")
    distributed.check_devices(2, "auto")
    distributed.check_devices(16, "cpu")  # CPU processes are not tied to devices


# ----------------------------------------------------------------------------- strategies


def _cfg(tmp_path, method: dict, **dist):
    return validate_config(_raw(tmp_path, method=method, distributed=dist))


@pytest.mark.parametrize("method, dist, message", [
    ({"name": "galore"}, {"strategy": "fsdp"}, "builds its own optimizer"),
    ({"name": "galore", "layerwise": True}, {"strategy": "fsdp"}, "builds its own optimizer"),
    ({"name": "lora_plus"}, {"strategy": "fsdp"}, "builds its own optimizer"),
    ({"name": "adalora"}, {"strategy": "fsdp"}, "full weights and gradients"),
    ({"name": "pissa"}, {"strategy": "fsdp"}, "base-changing"),
    ({"name": "lora", "init": "olora"}, {"strategy": "fsdp"}, "base-changing"),
    ({"name": "qlora"}, {"strategy": "fsdp"}, "qlora' with FSDP"),
    ({"name": "qlora"}, {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}, "ZeRO-3"),
])
def test_strategy_the_method_cannot_take_is_refused(tmp_path, method, dist, message):
    from tuneforge.methods import get_method

    cfg = _cfg(tmp_path, method, **dist)
    with pytest.raises(UserError, match=message) as info:
        distributed.check_strategy(cfg, get_method(cfg.method.name), world_size=2)
    assert "strategy: ddp" in str(info.value) or "zero_stage: 2" in str(info.value)
    distributed.check_strategy(cfg, get_method(cfg.method.name), world_size=1)  # one process: no engine


def test_strategies_the_method_can_take_pass(tmp_path):
    from tuneforge.methods import get_method

    for method, dist in (({"name": "galore"}, {"strategy": "ddp"}), ({"name": "lora"}, {"strategy": "fsdp"}),
                         ({"name": "full"}, {"strategy": "fsdp"}), ({"name": "dora"}, {"strategy": "fsdp"})):
        cfg = _cfg(tmp_path, method, **dist)
        distributed.check_strategy(cfg, get_method(cfg.method.name), world_size=2)


def test_deepspeed_missing_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from tuneforge.methods import get_method

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    cfg = _cfg(tmp_path, {"name": "lora"}, strategy="deepspeed")
    with pytest.raises(UserError, match=r"tuneforge\[distributed\]"):
        distributed.check_strategy(cfg, get_method("lora"), world_size=2)


# ----------------------------------------------------------------------------- engine configs


@pytest.mark.parametrize("options, expect", [
    ({"zero_stage": 1}, {"stage": 1}),
    ({"zero_stage": 2, "offload_optimizer": True}, {"stage": 2, "offload_optimizer": {"device": "cpu",
                                                                                      "pin_memory": True}}),
    ({"zero_stage": 3, "offload_parameters": True}, {"stage": 3, "offload_param": {"device": "cpu",
                                                                                   "pin_memory": True},
                                                    "stage3_gather_16bit_weights_on_model_save": True}),
])
def test_deepspeed_json_follows_the_section(tmp_path, options, expect):
    cfg = validate_config(_raw(tmp_path, distributed={"strategy": "deepspeed", "deepspeed": options}))
    ds = distributed.deepspeed_config(cfg.distributed.deepspeed)
    for key, value in expect.items():
        assert ds["zero_optimization"][key] == value
    if options.get("zero_stage") != 3:
        assert "stage3_gather_16bit_weights_on_model_save" not in ds["zero_optimization"]
    assert ("optimizer" in ds) == bool(options.get("offload_optimizer"))  # ZeRO-Offload steps with DS's CPU Adam
    # Batch, accumulation, clipping and precision come from train: through the Trainer's "auto".
    assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    written = distributed.write_engine_config(cfg, run_dir)
    assert json.loads(written.read_text()) == ds


def test_deepspeed_json_is_accepted_by_the_trainer_config(tmp_path):
    """The Trainer's DeepSpeed config reader fills every "auto" from the run's train: section."""
    pytest.importorskip("deepspeed")
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    cfg = validate_config(_raw(tmp_path, distributed={"strategy": "deepspeed"}))
    hf = HfTrainerDeepSpeedConfig(distributed.deepspeed_config(cfg.distributed.deepspeed))
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=3,
                             gradient_accumulation_steps=5, max_grad_norm=0.5, use_cpu=True, report_to=[])
    hf.trainer_config_process(args)
    assert hf.config["train_micro_batch_size_per_gpu"] == 3 and hf.config["gradient_accumulation_steps"] == 5
    assert hf.config["gradient_clipping"] == 0.5


def test_fsdp_config_and_trainer_arguments(tmp_path):
    cfg = validate_config(_raw(tmp_path, distributed={"strategy": "fsdp", "fsdp": {
        "sharding": "shard_grad_op", "cpu_offload": True, "activation_checkpointing": True}}))
    two = distributed.World(rank=0, world_size=2, local_world_size=2)
    args = distributed.trainer_arguments(cfg, tmp_path, two, "cpu")
    assert args["fsdp"] is True and args["ddp_backend"] == "gloo" and args["ddp_timeout"] == 600
    fsdp = args["fsdp_config"]
    assert fsdp["reshard_after_forward"] is False and fsdp["cpu_offload"] is True
    assert fsdp["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["state_dict_type"] == "FULL_STATE_DICT"
    assert distributed.trainer_arguments(cfg, tmp_path, distributed.World(), "cpu") == {}  # one process
    ddp = validate_config(_raw(tmp_path, distributed={"backend": "nccl", "timeout_minutes": 5}))
    args = distributed.trainer_arguments(ddp, tmp_path, two, "cuda")
    assert args == {"ddp_backend": "nccl", "ddp_timeout": 300, "ddp_find_unused_parameters": False}
    v1 = validate_config(_raw(tmp_path, distributed={"strategy": "fsdp", "fsdp": {"version": 1,
                                                                                 "sharding": "hybrid_shard"}}))
    assert distributed.fsdp_config(v1.distributed.fsdp)["reshard_after_forward"] == "hybrid_shard"


# ----------------------------------------------------------------------------- resume rules


def _checkpoint(tmp_path: Path, world_size: int | None, strategy: str = "ddp") -> Path:
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    if world_size is not None:
        distributed.write_checkpoint_world(folder, world_size, strategy)
    return folder


def test_resume_on_another_world_size(tmp_path, capsys):
    ddp = _checkpoint(tmp_path, 2)
    distributed.check_resume_world(ddp, 4, "ddp")
    said = capsys.readouterr().out
    assert "world size 2 → 4" in said and "global batch" in said
    distributed.check_resume_world(ddp, 2, "ddp")
    assert capsys.readouterr().out == ""
    with pytest.raises(UserError, match="written by strategy ddp"):
        distributed.check_resume_world(ddp, 2, "fsdp")


def test_resume_deepspeed_needs_the_same_world_size(tmp_path):
    ds = _checkpoint(tmp_path, 4, "deepspeed")
    with pytest.raises(UserError, match="4 DeepSpeed ranks and this launch has 2"):
        distributed.check_resume_world(ds, 2, "deepspeed")
    distributed.check_resume_world(ds, 4, "deepspeed")


def test_resume_of_a_single_process_checkpoint(tmp_path, capsys):
    old = _checkpoint(tmp_path, None)  # written before this feature / by one process
    distributed.check_resume_world(old, 1, "ddp")
    assert capsys.readouterr().out == ""
    distributed.check_resume_world(old, 2, "ddp")
    assert "world size 1 → 2" in capsys.readouterr().out


# ----------------------------------------------------------------------------- rank-0-only writes


def test_metrics_are_written_by_rank_zero_only(tmp_path):
    from tuneforge.train.callbacks import MetricsFileCallback

    callback = MetricsFileCallback(tmp_path)
    other = SimpleNamespace(is_world_process_zero=False, global_step=1)
    callback.on_log(None, other, None, logs={"loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()
    callback.on_log(None, SimpleNamespace(is_world_process_zero=True, global_step=1), None, logs={"loss": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_report_status_rank_zero_wins(tmp_path, monkeypatch):
    status = tmp_path / "status"
    monkeypatch.setenv(distributed.STATUS_ENV, str(status))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    distributed.report_status(0)
    assert not status.exists()  # another rank's success says nothing
    distributed.report_status(2)
    assert status.read_text().strip() == "2"
    distributed.report_status(1)
    assert status.read_text().strip() == "2"  # the first failure is kept
    monkeypatch.setenv("RANK", "0")
    distributed.report_status(75)
    assert status.read_text().strip() == "75"


def test_python_dash_m_tuneforge_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--nproc" in out.stdout and "--master-addr" in out.stdout


# ----------------------------------------------------------------------------- estimate per strategy


@pytest.fixture(scope="module")
def qwen_spec():
    from tuneforge.estimate import model_spec

    return model_spec("Qwen/Qwen2.5-0.5B")  # the built-in table: no download


def _bill(spec, **kwargs):
    from tuneforge.estimate import Setup, estimate_memory

    base = {"method": "full", "batch_size": 1, "seq_len": 512, "precision": "bf16", "gradient_checkpointing": True}
    return estimate_memory(spec, Setup(**{**base, **kwargs}))


def test_estimate_shards_the_state_as_each_engine_does(qwen_spec):
    one = _bill(qwen_spec).components
    state = ("weights", "master_weights", "gradients", "optimizer")
    n = 8
    ddp = _bill(qwen_spec, gpus=n, strategy="ddp").components
    assert all(ddp[k] == one[k] for k in state) and ddp["distributed"] == one["gradients"]  # DDP's buckets
    zero1 = _bill(qwen_spec, gpus=n, strategy="zero1").components
    assert zero1["optimizer"] == one["optimizer"] // n and zero1["master_weights"] == one["master_weights"] // n
    assert zero1["gradients"] == one["gradients"] and zero1["weights"] == one["weights"]
    zero2 = _bill(qwen_spec, gpus=n, strategy="zero2").components
    assert zero2["gradients"] == one["gradients"] // n and zero2["weights"] == one["weights"]
    for name in ("zero3", "fsdp"):
        sharded = _bill(qwen_spec, gpus=n, strategy=name).components
        assert all(sharded[k] == one[k] // n for k in state), name
        assert sharded["distributed"] > 0  # the gathered weights of the block computed and the one prefetched
    # ZeRO's 16 bytes/parameter (2 weights + 2 gradients + 12 optimizer) become 2 + 14/N at stage 2 and 16/N at
    # stage 3 (Rajbhandari et al. 2020, fig. 1).
    params = _bill(qwen_spec).total_params
    assert sum(zero2[k] for k in state) == pytest.approx(2 * params + 14 * params / n, rel=1e-3)
    assert sum(_bill(qwen_spec, gpus=n, strategy="zero3").components[k] for k in state) == \
        pytest.approx(16 * params / n, rel=1e-3)
    totals = [_bill(qwen_spec, gpus=n, strategy=s).total_bytes for s in ("ddp", "zero1", "zero2", "zero3")]
    assert totals == sorted(totals, reverse=True)


def test_estimate_on_one_gpu_is_unchanged_by_strategy(qwen_spec):
    plain = _bill(qwen_spec)
    assert _bill(qwen_spec, gpus=1, strategy="zero3").total_bytes == plain.total_bytes
    assert plain.components["distributed"] == 0


def test_estimate_adapters_shard_the_frozen_base_only_under_full_shard(qwen_spec):
    one = _bill(qwen_spec, method="lora")
    zero2 = _bill(qwen_spec, method="lora", gpus=4, strategy="zero2")
    fsdp = _bill(qwen_spec, method="lora", gpus=4, strategy="fsdp")
    assert zero2.components["weights"] == one.components["weights"]
    assert fsdp.components["weights"] == one.components["weights"] // 4


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "galore", "strategy": "zero2"}, "GaLore"),
    ({"method": "qlora", "strategy": "zero3"}, "QLoRA"),
    ({"strategy": "tp"}, "--strategy 'tp'"),
    ({"gpus": 0}, "--gpus 0"),
])
def test_estimate_refuses_what_training_refuses(qwen_spec, kwargs, message):
    with pytest.raises(UserError, match=message):
        _bill(qwen_spec, gpus=kwargs.pop("gpus", 2), **kwargs)


def test_estimate_cli_reads_the_run_configs_strategy(tmp_path, capsys):
    config = _config_file(tmp_path, distributed={"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}})
    assert main(["estimate", str(config), "--gpus", "4", "--json"]) == 0
    bill = json.loads(capsys.readouterr().out)
    assert bill["setup"]["strategy"] == "zero3" and bill["setup"]["gpus"] == 4
    assert main(["estimate", str(config), "--gpus", "4", "--strategy", "ddp", "--json"]) == 0  # the flag wins
    assert json.loads(capsys.readouterr().out)["setup"]["strategy"] == "ddp"
