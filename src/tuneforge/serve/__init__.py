"""Serving: an OpenAI-compatible HTTP API (``create_app``, ``Engine``) and a terminal chat (``chat_loop``).

Imported lazily: ``import tuneforge.serve`` loads neither torch nor fastapi.
"""

from __future__ import annotations

from tuneforge.utils import lazy_exports

_EXPORTS = {
    "Engine": "tuneforge.serve.engine",
    "create_app": "tuneforge.serve.app",
    "chat_loop": "tuneforge.serve.chat",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)
