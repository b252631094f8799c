"""Serving: an OpenAI-compatible HTTP API (``create_app``, ``Engine``) and a terminal chat (``chat_loop``).

Imported lazily: ``import tuneforge.serve`` loads neither torch nor fastapi.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "tuneforge.serve.engine",
    "Settings": "tuneforge.serve.engine",
    "create_app": "tuneforge.serve.app",
    "chat_loop": "tuneforge.serve.chat",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tuneforge.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
