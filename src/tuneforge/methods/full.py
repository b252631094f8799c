"""Full fine-tuning: every parameter of the model trains (the baseline every other method is measured against)."""

from __future__ import annotations

from typing import Any

from tuneforge.config.methods import FullMethodConfig
from tuneforge.methods.base import Method, register


class FullMethod(Method):
    """All parameters trainable; the result is saved as a full model (not an adapter)."""

    reference = "full fine-tuning (all weights updated)"
    mergeable = False
    is_adapter = False
    priced_as = "full"

    def apply(self, model: Any, cfg: Any) -> Any:
        """Return ``model`` itself with ``requires_grad=True`` on every floating-point parameter."""
        for param in model.parameters():
            # Integer (quantized) storage cannot carry gradients; full fine-tuning of such weights is not possible.
            param.requires_grad = param.is_floating_point()
        return model


register(FullMethodConfig, FullMethod)
