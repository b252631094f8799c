"""Models: device/precision, local tokenizers, from-config builds, loading, target modules.

Functions are re-exported lazily so that importing this package does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "train_tokenizer": "tuneforge.models.tokenizer",
    "build_model": "tuneforge.models.build",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tuneforge.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
