"""Memory bill and method recommendation (``tuneforge estimate``).

Public entry points (imported lazily so that ``import tuneforge.estimate`` does not import torch):

* ``model_spec(source) -> ModelSpec`` — exact parameter counts and linear shapes from a config, on the meta device;
* ``estimate_memory(spec, Setup(...)) -> Bill`` — bytes per component and the peak;
* ``recommend(model_source, budget_gb, seq_len, target_batch, ...) -> Recommendation``;
* ``recommend_for_run(cfg) -> dict`` — the ``method:`` section for ``method.name: auto``;
  ``recommendation_for_run(cfg)`` also gives the ``train:`` keys.
"""

from __future__ import annotations

from tuneforge.utils import lazy_exports

_EXPORTS = {
    "model_spec": "tuneforge.estimate.spec",
    "ModelSpec": "tuneforge.estimate.spec",
    "Setup": "tuneforge.estimate.bill",
    "Bill": "tuneforge.estimate.bill",
    "estimate_memory": "tuneforge.estimate.bill",
    "Recommendation": "tuneforge.estimate.choose",
    "recommend": "tuneforge.estimate.choose",
    "recommend_for_run": "tuneforge.estimate.choose",
    "recommendation_for_run": "tuneforge.estimate.choose",
    "setup_from_run": "tuneforge.estimate.choose",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
