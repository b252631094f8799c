"""LoRA+ — Hayou, Ghosh & Yu, 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models" (ICML 2024).

The adapter is plain LoRA, ``W = W0 + (α/r)·B A``; only the optimizer changes: ``B`` is trained with a larger
learning rate than ``A``, ``η_B = λ · η_A`` with ``λ`` = ``lr_ratio`` (the paper recommends ~16), which their
infinite-width analysis shows is needed for efficient feature learning. ``η_A`` is ``train.lr``. Built with peft's
``create_loraplus_optimizer`` (bias-free 1-D parameters such as DoRA magnitudes go with ``B``; LoRA on embeddings
gets ``lr_embedding``). Mergeable like LoRA.
"""

from __future__ import annotations

from typing import Any

from tuneforge.config.methods import LoraPlusMethodConfig
from tuneforge.methods.base import register
from tuneforge.methods.lora import LoraMethod
from tuneforge.methods.optim import optimizer_class
from tuneforge.methods.optimizers import refuse_embedding_lr


class LoraPlusMethod(LoraMethod):
    """LoRA whose ``B`` matrices learn ``lr_ratio`` times faster than ``A``."""

    reference = "Hayou et al., 2024 — LoRA+: Efficient Low Rank Adaptation of Large Models"
    owns_optimizer = True  # A and B in parameter groups of their own learning rates
    shardable = False  # the optimizer is built over whole, unsharded parameters

    def create_optimizer(self, model: Any, cfg: Any, train_cfg: Any) -> Any:
        """The LoRA+ optimizer: ``train.optim``'s class with groups A at ``lr`` and B at ``lr * lr_ratio``."""
        refuse_embedding_lr("lora_plus", train_cfg)
        from peft.optimizers import create_loraplus_optimizer

        optimizer_cls, extra = optimizer_class(train_cfg)
        kwargs = dict(extra)
        if cfg.lr_embedding is not None:
            kwargs["loraplus_lr_embedding"] = cfg.lr_embedding
        return create_loraplus_optimizer(
            model,
            optimizer_cls,
            lr=train_cfg.lr,
            loraplus_lr_ratio=cfg.lr_ratio,
            loraplus_weight_decay=train_cfg.weight_decay,
            **kwargs,
        )


register(LoraPlusMethodConfig, LoraPlusMethod)
