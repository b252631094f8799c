"""Shared fixtures: a tokenizer trained in process on stdlib text and tiny Llama / GPT-2 models.

Everything is built locally (no network). Session-scoped where it is read-only, so the whole suite trains one
tokenizer.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import stdlib_texts, tiny_from_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Same numbers on every CPU: `precision: auto` would pick bf16 on CPUs with AMX (subprocesses inherit this).
os.environ.setdefault("TUNEFORGE_AUTO_PRECISION", "fp32")
# The prepared-data cache of every run the tests start (subprocesses too) goes to one temporary directory of this
# test session, not to the user's ~/.cache/tuneforge.
if "TUNEFORGE_DATA_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TUNEFORGE_DATA_CACHE"] = tempfile.mkdtemp(prefix="tuneforge-test-data-cache-")
    atexit.register(shutil.rmtree, os.environ["TUNEFORGE_DATA_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE tokenizer, vocab ~512, with distinct pad and chat special tokens."""
    from tuneforge.models import train_tokenizer

    return train_tokenizer(stdlib_texts(), vocab_size=512)


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    """A fresh 2-layer, hidden-64 Llama-style model (seeded, fp32, CPU)."""
    import torch

    from tuneforge.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_from_config("llama"), tiny_tokenizer)


@pytest.fixture()
def tiny_llama_dir(tmp_path, tiny_llama, tiny_tokenizer):
    """:func:`tiny_llama` saved with its tokenizer: a model directory the commands load."""
    path = tmp_path / "tiny"
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tiny_gpt2(tiny_tokenizer):
    """A fresh 2-layer, hidden-64 GPT-2-style model (Conv1D projections)."""
    import torch

    from tuneforge.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_from_config("gpt2"), tiny_tokenizer)
