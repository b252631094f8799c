"""``method.name: auto``: the method ``tuneforge estimate`` recommends for ``train.memory_budget_gb``.

There is no implementation to register: training replaces this section by the recommendation's ``method:``
section (and its ``train:`` keys) before anything loads (``estimate.choose.recommendation_for_run``).
"""

from __future__ import annotations

from tuneforge.config.methods import AutoMethodConfig
from tuneforge.methods.base import register

register(AutoMethodConfig)
