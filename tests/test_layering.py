"""The import rules of docs/architecture.md hold (import-linter contracts in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout


def test_config_and_cli_parser_import_no_torch():
    # `tuneforge validate` and `tuneforge --help` must be instant: no torch/transformers at import time.
    code = ("import sys, tuneforge.config, tuneforge.cli; tuneforge.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_cli_keeps_deepspeeds_accelerator_probe_off_stdout():
    """deepspeed, when installed, prints its CPU fallback on stdout as accelerate imports it (any model save): the
    CLI's setup must keep stdout clean for --json output."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed (the distributed extra) is not installed")
    from tuneforge.cli import GPU_DEVICE_NODES

    if any(os.path.exists(f"/dev/{node}") for node in GPU_DEVICE_NODES):
        pytest.skip("a GPU device node exists: deepspeed picks its accelerator itself")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    save = ("import tempfile; from transformers import LlamaConfig, LlamaForCausalLM; "
            "LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, vocab_size=64)).save_pretrained(tempfile.mkdtemp())")
    setup = "from tuneforge.cli import quiet_library_noise; quiet_library_noise(); "
    out = subprocess.run([sys.executable, "-c", setup + save], env=env, capture_output=True, text=True, check=True)
    assert "Setting accelerator" not in out.stdout
    bare = subprocess.run([sys.executable, "-c", save], env=env, capture_output=True, text=True, check=True)
    assert "Setting accelerator to CPU" in bare.stdout  # what the CLI's setup prevents
