"""QLoRA — Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).

The frozen base weights are stored in 4-bit NormalFloat (NF4, quantiles of N(0, 1) so that normally distributed
weights use every code equally) with double quantization (the per-block fp32 scales are themselves quantized to
8 bits, ~0.37 bit/parameter saved); each matmul dequantizes a block to the compute dtype, and LoRA adapters
(``W_nf4 + (alpha / r) * B @ A`` in the compute dtype) are the only trained weights. ``bits: 8`` loads the base
with LLM.int8() instead.

bitsandbytes 0.50 has a CPU backend (x86-64) besides CUDA, so this runs on CPU too.
"""

from __future__ import annotations

from typing import Any

from tuneforge.config.methods import QLoraMethodConfig
from tuneforge.errors import UserError
from tuneforge.methods.base import register
from tuneforge.methods.lora import LoraMethod

INSTALL_HINT = "pip install 'bitsandbytes==0.50.2' (or: pip install 'tuneforge[quant]')"


def require_bitsandbytes() -> None:
    """Check that bitsandbytes is importable and has a backend for a device here.

    Raises:
        UserError: saying what to install.
    """
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library (RuntimeError/OSError)
        raise UserError(f"method qlora needs bitsandbytes with a 4-bit backend ({exc}); {INSTALL_HINT}") from exc
    from transformers.integrations import validate_bnb_backend_availability

    if not validate_bnb_backend_availability(raise_exception=False):
        raise UserError(
            "method qlora: the installed bitsandbytes has no backend for any device here; "
            f"{INSTALL_HINT} (CPU x86-64 and CUDA are supported), or use method lora"
        )


def compute_dtype(cfg: Any, run_dtype: Any):
    """The dtype the dequantized matmuls run in: ``cfg.compute_dtype``, or the run's dtype for ``auto``."""
    import torch

    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if cfg.compute_dtype == "auto":
        return run_dtype or torch.float32
    return names[cfg.compute_dtype]


class QLoraMethod(LoraMethod):
    """LoRA on a 4-bit NF4 (or 8-bit) quantized, frozen base model."""

    reference = "Dettmers et al., 2023. QLoRA: Efficient Finetuning of Quantized LLMs. arXiv:2305.14314"
    mergeable = True  # into a de-quantized copy of the base
    priced_as = "qlora"
    quantized_base = True

    def model_load_kwargs(self, cfg: Any, dtype: Any) -> dict:
        """``{"quantization_config": BitsAndBytesConfig(...)}``; ``load_model`` places it on the run's device.

        Raises:
            UserError: bitsandbytes missing or without a backend.
        """
        require_bitsandbytes()
        from transformers import BitsAndBytesConfig

        if cfg.bits == 8:
            quant = BitsAndBytesConfig(load_in_8bit=True)
        else:
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=cfg.quant_type,
                bnb_4bit_use_double_quant=cfg.double_quant,
                bnb_4bit_compute_dtype=compute_dtype(cfg, dtype),
            )
        return {"quantization_config": quant}

    def apply(self, model: Any, cfg: Any) -> Any:
        """Prepare the quantized model for k-bit training (norms and embeddings in fp32, base frozen), then LoRA.

        Raises:
            UserError: when ``model`` was not loaded quantized (load it with :meth:`model_load_kwargs`).
        """
        from peft import prepare_model_for_kbit_training

        from tuneforge.models.quant import keep_cpu_weights_trainable

        if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
            raise UserError(
                "method qlora: the model was not loaded quantized; load it with the method's model_load_kwargs "
                "(tuneforge train does this)"
            )
        # Gradient checkpointing is the trainer's choice (train.gradient_checkpointing), not the method's; inputs
        # still require grad so that checkpointing, if enabled later, has a graph to recompute.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.enable_input_require_grads()
        # Also done by load_model; repeated for models loaded elsewhere (see the function for why).
        keep_cpu_weights_trainable(model)
        return super().apply(model, cfg)


register(QLoraMethodConfig, QLoraMethod)
