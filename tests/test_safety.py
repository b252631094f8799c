"""Nothing lost: outputs, run directories and checkpoints that no typo, signal or second process can destroy.

Covers issue 10: the merge/export ``--out`` guard, ``train --overwrite`` that validates first and deletes last, a
fresh start over an unfinished run, the per-run lock, SIGTERM → complete checkpoint → ``--resume``, setup changes
on resume, fsync before ``COMPLETE``, files written with the user's umask, the default run name.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_run_config, write_chat_items
from tuneforge.cli import main
from tuneforge.errors import UserError

TUNEFORGE = str(Path(sys.executable).parent / "tuneforge")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_items(tmp_path_factory.mktemp("data"), 120, seed=1)


def _cfg(out: Path, data: Path, **train) -> dict:
    return tiny_run_config(out, data / "train.jsonl", train={"max_steps": 4, "batch_size": 4, "lr": 3e-3,
                                                             "logging_steps": 1, "save_steps": 2, **train})


def _write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(raw: dict, **kwargs):
    from tuneforge.config import validate_config
    from tuneforge.train.run import run_training

    return run_training(validate_config(raw), echo=lambda *_: None, **kwargs)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file and directory under ``folder`` (hidden ones too) with a hash of its content."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        state[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def _final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, chat_data) -> Path:
    """``runs/`` holding one finished LoRA run ``sft`` (never changed by the tests that use it)."""
    folder = tmp_path_factory.mktemp("project") / "runs"
    _train(_cfg(folder / "sft", chat_data, max_steps=2, save_steps=None))
    return folder


# ----------------------------------------------------------------------------- merge / export --out


@pytest.mark.parametrize("where", ["runs", "runs/sft", "runs/sft/final", "runs/sft/final/merged", "runs/sft/base"])
@pytest.mark.slow
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_merge_out_that_is_holds_or_lies_inside_an_input_is_refused(runs, capsys, where, force):
    before = _snapshot(runs.parent)
    out = runs.parent / where
    assert main(["merge", str(runs / "sft"), "--out", str(out), *(["--force"] if force else [])]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "Traceback" not in err
    assert _snapshot(runs.parent) == before


@pytest.mark.slow
def test_merge_recipe_out_on_a_recipe_input_is_refused(runs, tmp_path, capsys):
    recipe = _write_config(tmp_path / "recipe.yaml", {
        "merge_method": "linear", "base_model": str(runs / "sft" / "base"),
        "models": [{"model": str(runs / "sft"), "parameters": {"weight": 1.0}}]})
    before = _snapshot(runs.parent)
    for out in (runs / "sft" / "base", runs, tmp_path):
        assert main(["merge", str(recipe), "--out", str(out), "--force"]) == 2, out
    assert _snapshot(runs.parent) == before and recipe.is_file()
    assert "recipe.yaml" in capsys.readouterr().err  # tmp_path holds the recipe itself


@pytest.mark.slow
def test_merge_existing_non_empty_out_needs_force(runs, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["merge", str(runs / "sft"), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert _snapshot(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}

    assert main(["merge", str(runs / "sft"), "--out", str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary or old copy left beside it


@pytest.mark.slow
def test_merge_into_an_empty_directory_needs_no_force(runs, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["merge", str(runs / "sft"), "--out", str(out)]) == 0
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("where", ["sft", "sft/final", "."])
@pytest.mark.slow
def test_export_out_on_its_source_is_refused(runs, capsys, where):
    before = _snapshot(runs.parent)
    assert main(["export", str(runs / "sft"), "--quantize", "int8", "--out", str(runs / where), "--force"]) == 2
    assert "--out" in capsys.readouterr().err
    assert _snapshot(runs.parent) == before


# ----------------------------------------------------------------------------- train: overwrite, unfinished runs


@pytest.mark.slow
def test_overwrite_with_a_typo_leaves_the_old_run_whole(tmp_path, chat_data, capsys):
    out = tmp_path / "runs" / "typo"
    config = _write_config(tmp_path / "typo.yaml", _cfg(out, chat_data, max_steps=2, save_steps=None))
    assert main(["train", str(config)]) == 0
    before = _snapshot(out.parent)
    for mistake in ("data.train=typo.jsonl", "method.target_modules=[qkv_proj]", "model.chat_template=chatmlx"):
        assert main(["train", str(config), "--overwrite", mistake]) == 2, mistake
        assert "Traceback" not in capsys.readouterr().err
        assert _snapshot(out.parent) == before, mistake


@pytest.mark.slow
def test_overwrite_replaces_the_run_only_once_the_new_one_finished(tmp_path, chat_data):
    out = tmp_path / "runs" / "again"
    config = _write_config(tmp_path / "again.yaml", _cfg(out, chat_data, max_steps=2, save_steps=None))
    assert main(["train", str(config)]) == 0
    assert main(["train", str(config), "--overwrite", "train.max_steps=3"]) == 0
    assert json.loads((out / "summary.json").read_text())["global_step"] == 3
    assert (out / "tuneforge_run.json").is_file()
    # the replaced run was kept aside while training and removed at the end; only the lock file stays beside it
    assert sorted(p.name for p in out.parent.iterdir()) == [".again.lock", "again"]


@pytest.mark.slow
def test_overwrite_that_fails_before_training_puts_the_old_run_back(tmp_path, chat_data, monkeypatch):
    from tuneforge.train import trainer as trainer_module

    out = tmp_path / "runs" / "back"
    raw = _cfg(out, chat_data, max_steps=2, save_steps=None)
    _train(raw)
    before = _snapshot(out.parent)

    def broken(*args, **kwargs):
        assert not (out / "final").exists()  # the old run is aside by now
        raise RuntimeError("trainer could not be built")

    monkeypatch.setattr(trainer_module, "build_trainer", broken)
    with pytest.raises(RuntimeError, match="could not be built"):
        _train(raw, overwrite=True)
    assert _snapshot(out.parent) == before


@pytest.mark.slow
def test_a_directory_that_is_not_a_run_is_never_written_or_replaced(tmp_path, chat_data, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    config = _write_config(tmp_path / "mine.yaml", _cfg(out, chat_data, max_steps=1))
    for flags in ([], ["--overwrite"]):
        assert main(["train", str(config), *flags]) == 2
        assert "not a tuneforge run" in capsys.readouterr().err
    assert _snapshot(out) == {"thesis.tex": hashlib.sha256(b"years of work").hexdigest()}


@pytest.fixture()
def unfinished(tmp_path, chat_data) -> tuple[Path, Path]:
    """A run with complete checkpoints and no ``final/`` (what a killed run leaves), and its config file."""
    import shutil

    out = tmp_path / "runs" / "unfinished"
    raw = _cfg(out, chat_data)
    _train(raw)
    shutil.rmtree(out / "final")
    return out, _write_config(tmp_path / "unfinished.yaml", raw)


@pytest.mark.slow
def test_fresh_start_over_an_unfinished_run_is_refused(unfinished, capsys):
    out, config = unfinished
    before = _snapshot(out)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unfinished run" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(out) == before


@pytest.mark.slow
def test_resume_with_a_changed_setup_says_what_differs(unfinished, capsys):
    out, config = unfinished
    before = _snapshot(out)
    assert main(["train", str(config), "--resume", "method.r=8", "data.max_length=96"]) == 2
    err = capsys.readouterr().err
    assert "method.r: 4 → 8" in err and "data.max_length: 128 → 96" in err and "--allow-config-change" in err
    assert _snapshot(out) == before
    # training settings are not the setup: more steps continue the same run
    assert main(["train", str(config), "--resume", "train.max_steps=6"]) == 0
    assert json.loads((out / "summary.json").read_text())["global_step"] == 6


@pytest.mark.slow
def test_allow_config_change_resumes_anyway(unfinished):
    out, config = unfinished
    assert main(["train", str(config), "--resume", "data.max_length=96", "--allow-config-change"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["max_length"] == 96


@pytest.mark.slow
def test_allow_config_change_to_the_adapters_shape_is_refused_before_anything_is_written(unfinished, capsys):
    out, config = unfinished
    before = _snapshot(out)
    assert main(["train", str(config), "--resume", "method.r=8", "--allow-config-change"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this config's model" in err and "lora_A" in err and "[4, " in err and "[8, " in err
    assert "Traceback" not in err
    assert _snapshot(out) == before  # config.yaml still says r=4: the run can be resumed as it was


@pytest.mark.slow
def test_resume_and_overwrite_together_are_refused(unfinished, capsys):
    out, config = unfinished
    assert main(["train", str(config), "--resume", "--overwrite"]) == 2
    assert "only one" in capsys.readouterr().err


# ----------------------------------------------------------------------------- lock, SIGTERM


@pytest.mark.slow
def test_second_process_on_one_run_is_refused_and_a_killed_holder_releases_it(tmp_path, chat_data, capsys):
    out = tmp_path / "runs" / "locked"
    config = _write_config(tmp_path / "locked.yaml", _cfg(out, chat_data, max_steps=1, save_steps=None))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom tuneforge.train.rundir import run_lock\n"
         "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(300)\n", str(out)],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert main(["train", str(config)]) == 2
        err = capsys.readouterr().err
        assert "in use by another tuneforge process" in err and f"pid {holder.pid}" in err
        assert not out.exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs; the kernel drops the lock with the process
        holder.wait()
    assert main(["train", str(config)]) == 0


def _logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_ends_like_an_uninterrupted_run(tmp_path, chat_data, capsys):
    import torch

    from tuneforge.train import checkpoints

    steps = 100  # ~30 ms each here: room to signal mid-run even on a busy machine
    out = tmp_path / "runs" / "preempted"
    raw = _cfg(out, chat_data, max_steps=steps, save_steps=None)
    config = _write_config(tmp_path / "preempted.yaml", raw)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "train.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen([TUNEFORGE, "train", str(config)], stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 300
        while _logged_step(out) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"training ended before it could be interrupted:\n{log.read_text()[-2000:]}"
        # a second process on the same run is refused while the first trains
        assert main(["train", str(config), "--resume"]) == 2
        assert "in use by another tuneforge process" in capsys.readouterr().err
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 75, log.read_text()[-3000:]
    assert "--resume" in log.read_text()
    saved = checkpoints.latest_checkpoint(out / "checkpoints")
    assert saved is not None and 3 <= checkpoints.checkpoint_step(saved) < steps
    assert not (out / "final").exists()
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert not [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]

    assert main(["train", str(config), "--resume"]) == 0
    straight = tmp_path / "runs" / "straight"
    _train(_cfg(straight, chat_data, max_steps=steps, save_steps=None))
    a, b = _final_weights(straight), _final_weights(out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_dir_replaces_only_its_target_and_cleans_up_on_error(tmp_path):
    from tuneforge.utils import atomic_dir

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    bystander = tmp_path / ".out.old"  # the name the old implementation deleted without being asked
    bystander.mkdir()
    (bystander / "keep.txt").write_text("keep")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("failed half way")
    assert _snapshot(target) == {"old.txt": hashlib.sha256(b"old").hexdigest()}
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert (bystander / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old", "out"]


def test_sigterm_inside_atomic_dir_removes_the_temporary_directory(tmp_path):
    script = ("import sys, time\nfrom tuneforge.utils import atomic_dir\n"
              "with atomic_dir(sys.argv[1]) as tmp:\n    (tmp / 'part').write_text('x')\n"
              "    print(tmp, flush=True)\n    time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE)
    tmp = Path(proc.stdout.readline().decode().strip())
    assert tmp.is_dir()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not tmp.exists() and not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_files_are_on_disk_before_the_complete_marker(tmp_path, monkeypatch):
    from tuneforge.train import checkpoints

    folder = tmp_path / "checkpoint-4"
    (folder / "sub").mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "sub/rng_state.pth"):
        (folder / name).write_bytes(b"x" * 10)
    flushed = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        flushed.append((os.readlink(f"/proc/self/fd/{fd}"), (folder / checkpoints.MARKER).exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    checkpoints.mark_complete(folder)
    before_marker = {path for path, marker in flushed if not marker}
    for name in ("adapter_model.safetensors", "optimizer.pt", "sub/rng_state.pth"):
        assert str((folder / name).resolve()) in before_marker, name
    assert (folder / checkpoints.MARKER).is_file()


@pytest.mark.slow
def test_files_are_written_with_the_users_umask(tmp_path, runs):
    from tuneforge.utils import atomic_dir, atomic_write_text, current_umask

    mask = current_umask()
    for name in ("config.yaml", "summary.json", "tuneforge_run.json", "final/adapter_config.json"):
        assert (runs / "sft" / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


# ----------------------------------------------------------------------------- config


def test_default_run_name_comes_from_the_config_file(tmp_path, chat_data):
    from tuneforge.config import load_config

    raw = _cfg(tmp_path / "x", chat_data)
    del raw["run_name"], raw["output_dir"]
    cfg = load_config(_write_config(tmp_path / "sft-small.yaml", raw))
    assert cfg.run_name == "sft-small" and cfg.output_dir == "runs/sft-small"
    assert load_config(tmp_path / "sft-small.yaml", ["run_name=demo"]).output_dir == "runs/demo"


def test_prepare_output_follows_symlinks(tmp_path):
    from tuneforge.utils import prepare_output

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("x")
    (tmp_path / "alias").symlink_to(run)
    with pytest.raises(UserError, match="is the input"):
        prepare_output(tmp_path / "alias", [run], force=True)
    with pytest.raises(UserError, match="lies inside"):
        prepare_output(tmp_path / "alias" / "merged", [run], force=True)
    assert prepare_output(tmp_path / "new", [run]) == tmp_path / "new"


@pytest.mark.parametrize("relative", [True, False])
def test_overwrite_removes_the_replaced_run_whatever_form_output_dir_has(tmp_path, monkeypatch, relative):
    """issue 22: with a relative ``output_dir`` the hidden ``.<run>.replaced-*`` copy was left on every overwrite."""
    from tuneforge.train import rundir

    monkeypatch.chdir(tmp_path)
    run_dir = Path("runs/rel") if relative else tmp_path / "runs" / "rel"
    first = rundir.begin(run_dir, "rel", resume=False, overwrite=False)
    (run_dir / "final").mkdir()
    first.finish()
    again = rundir.begin(run_dir, "rel", resume=False, overwrite=True)
    assert again.aside is not None and again.aside.is_dir()
    again.finish()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["rel"]
    assert rundir.read_manifest(run_dir)["replaces"] == []
