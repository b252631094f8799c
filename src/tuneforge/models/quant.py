"""Helpers for bitsandbytes-quantized models."""

from __future__ import annotations

from typing import Any


def keep_cpu_weights_trainable(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; undo a repack already done.

    Why: on a CPU with avx512_bf16, bitsandbytes 0.50.2 repacks a ``Linear4bit``'s weights in place at its first
    eval-mode forward without grad (``packing_format_for_cpu``). From then on its matmul takes a kernel with no
    autograd: no gradient flows back through the frozen base layers, so every LoRA matrix before the last layer
    silently gets a zero gradient (measured here: layer-0 ``lora_B`` grad norm 0.0078 → 0.0 after one eval
    forward), and layers with a bias fail outright. Training evaluates and samples mid-run, so the repack must
    never happen on a model being trained.

    Returns:
        The number of 4-bit layers changed.
    """
    try:
        from bitsandbytes.nn import Linear4bit
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
        changed += 1
    return changed
