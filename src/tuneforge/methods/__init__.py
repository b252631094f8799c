"""Fine-tuning methods, one module each, registered by name (see :mod:`tuneforge.methods.base`)."""

from tuneforge.methods.base import Method, get_method, known_methods, register

__all__ = ["Method", "get_method", "known_methods", "register"]
