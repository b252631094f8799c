"""Merging and export: LoRA merge into the base, model merging from mergekit-style recipes, quantized export.

Public entry points (imported lazily so that ``import tuneforge.merge`` does not import torch):
``merge_lora(path, out, ...)``, ``merge_recipe(recipe, out, ...)``, ``export_model(path, out, quantize=...)``,
``get_merge_method(name)``, ``known_merge_methods()``.
"""

from __future__ import annotations

from tuneforge.utils import lazy_exports

_EXPORTS = {
    "merge_lora": "tuneforge.merge.lora",
    "merge_recipe": "tuneforge.merge.recipe",
    "load_recipe": "tuneforge.merge.recipe",
    "export_model": "tuneforge.merge.export",
    "get_merge_method": "tuneforge.merge.methods",
    "known_merge_methods": "tuneforge.merge.methods",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)
