"""Fine-tuning methods, one module each (config class + implementation), registered by name (see
:mod:`tuneforge.methods.base`)."""

from tuneforge.methods.base import (
    Capabilities,
    Method,
    get_method,
    known_methods,
    method_class,
    priced_methods,
    register,
    registrations,
)

__all__ = ["Capabilities", "Method", "get_method", "known_methods", "method_class", "priced_methods", "register",
           "registrations"]
