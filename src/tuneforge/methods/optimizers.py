"""Optimizers: the class behind ``train.optim`` and the ``train.embedding_lr`` parameter group.

Its own module (not :mod:`tuneforge.methods.optim`) because :class:`tuneforge.methods.base.Method` builds the
embedding-group optimizer and ``optim`` imports ``base``: one import direction only.
"""

from __future__ import annotations

from typing import Any

from tuneforge.errors import UserError


def optimizer_class(train_cfg: Any) -> tuple[type, dict]:
    """The optimizer class and its extra kwargs for ``train.optim``.

    Returns:
        ``(cls, kwargs)``; ``cls(params, lr=..., weight_decay=..., **kwargs)`` builds it.

    Raises:
        UserError: ``adamw_8bit`` / ``paged_adamw_8bit`` without bitsandbytes installed (names the package).
    """
    import torch

    name = getattr(train_cfg, "optim", "adamw_torch") or "adamw_torch"
    if name == "adamw_torch":
        return torch.optim.AdamW, {}
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        try:
            import bitsandbytes.optim as bnb_optim
        except ImportError:
            raise UserError(
                f"train.optim: {name!r} needs bitsandbytes — install it with `pip install bitsandbytes==0.50.2` "
                "(or `pip install tuneforge[quant]`), or use train.optim: adamw_torch"
            ) from None
        return (bnb_optim.PagedAdamW8bit if name.startswith("paged") else bnb_optim.AdamW8bit), {}
    if name == "sgd":
        return torch.optim.SGD, {}
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor, {"scale_parameter": False, "relative_step": False}
    raise UserError(f"train.optim: {name!r} is not supported by this method; use adamw_torch")


def embedding_lr_optimizer(model: Any, train_cfg: Any) -> Any | None:
    """``train.optim``'s optimizer with the trainable embedding/output rows (new tokens of ``model.add_tokens``; a
    full fine-tune's embedding matrices; peft's trainable token rows) in a group of their own at
    ``train.embedding_lr``; ``None`` (the Trainer's default optimizer) when ``train.embedding_lr`` is unset.

    Weight decay follows the Trainer's rule (none on biases and norm weights). The scheduler scales every group
    alike, so the embedding rows keep their ratio to ``train.lr`` throughout.
    """
    embedding_lr = getattr(train_cfg, "embedding_lr", None)
    if embedding_lr is None:
        return None
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    from tuneforge.models.vocab import embedding_parameters

    embedding = {id(p) for p in embedding_parameters(model)}
    decay_names = set(get_parameter_names(model, ALL_LAYERNORM_LAYERS, ["bias", "layernorm", "rmsnorm"]))
    groups: dict[tuple[bool, bool], list] = {(e, d): [] for e in (False, True) for d in (False, True)}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        groups[(id(param) in embedding, name in decay_names)].append(param)
    optimizer_cls, extra = optimizer_class(train_cfg)
    param_groups = [
        {"params": params, "weight_decay": train_cfg.weight_decay if decay else 0.0,
         **({"lr": embedding_lr} if is_embedding else {})}
        for (is_embedding, decay), params in groups.items() if params
    ]
    return optimizer_cls(param_groups, lr=train_cfg.lr, **extra)


def refuse_embedding_lr(method_name: str, train_cfg: Any) -> None:
    """For methods that build their own parameter groups (LoRA+, GaLore): ``train.embedding_lr`` is not applied there.

    Raises:
        UserError: ``train.embedding_lr`` is set.
    """
    if getattr(train_cfg, "embedding_lr", None) is not None:
        raise UserError(f"train.embedding_lr with method {method_name!r}: the method builds its own optimizer "
                        "groups, which do not include an embedding group; remove train.embedding_lr (LoRA+ has "
                        "method.lr_embedding) or use method lora / full")
