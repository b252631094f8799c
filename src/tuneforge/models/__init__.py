"""Models: the model reference and loader, device/precision, local tokenizers, from-config builds, target modules,
generation.

Functions are re-exported lazily so that importing this package does not import torch.
"""

from __future__ import annotations

from tuneforge.utils import lazy_exports

_EXPORTS = {
    "train_tokenizer": "tuneforge.models.tokenizer",
    "build_model": "tuneforge.models.build",
    "resolve_device": "tuneforge.models.device",
    "resolve_dtype": "tuneforge.models.device",
    "cpu_has_native_bf16": "tuneforge.models.device",
    "cpu_has_amx_bf16": "tuneforge.models.device",
    "dtype_name": "tuneforge.models.device",
    "load_model": "tuneforge.models.load",
    "load_tokenizer": "tuneforge.models.load",
    "ensure_pad_token": "tuneforge.models.load",
    "linear_modules": "tuneforge.models.targets",
    "linear_module_paths": "tuneforge.models.targets",
    "resolve_target_modules": "tuneforge.models.targets",
    "targets_conv1d": "tuneforge.models.targets",
    "ARCHITECTURE_DEFAULTS": "tuneforge.models.targets",
    "generate": "tuneforge.models.generation",
    "stream_generate": "tuneforge.models.generation",
    "Loaded": "tuneforge.models.reference",
    "ModelRef": "tuneforge.models.reference",
    "load_for_inference": "tuneforge.models.reference",
    "resolve": "tuneforge.models.reference",
    "is_run_dir": "tuneforge.models.reference",
    "GenerationSettings": "tuneforge.models.generation",
    "Completion": "tuneforge.models.generation",
    "complete": "tuneforge.models.generation",
    "keep_cpu_weights_trainable": "tuneforge.models.quant",
    "count_parameters": "tuneforge.models.params",
    "format_parameters": "tuneforge.models.params",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
