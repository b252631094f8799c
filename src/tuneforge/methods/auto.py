"""``method.name: auto``: the method ``tuneforge estimate`` recommends for ``train.memory_budget_gb``.

There is no implementation to register: training replaces this section by the recommendation's ``method:``
section (and its ``train:`` keys) before anything loads (``estimate.choose.recommendation_for_run``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneforge.config.strict import Strict
from tuneforge.methods.base import register


class AutoMethodConfig(Strict):
    """Let ``tuneforge estimate`` choose the method that fits ``train.memory_budget_gb``."""

    name: Literal["auto"]
    r: int = Field(16, gt=0, description="LoRA/QLoRA rank, imposed only when written in the config")


register(AutoMethodConfig)
