"""GaLore — Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (ICML 2024).

Full-parameter training whose optimizer state lives in a low-rank subspace. For a weight matrix ``W`` with
gradient ``G_t`` (m × n), every ``T`` steps (``update_proj_gap``) the projector ``P_t`` is refreshed from the
top-``r`` left (or right) singular vectors of ``G_t``; Adam runs on ``R_t = P_tᵀ G_t`` (r × n instead of m × n)
and the update is projected back: ``W ← W − η · α · P_t N_t``, with ``N_t`` Adam's normalised step on ``R_t`` and
``α`` = ``scale``. Parameters outside the target modules (embeddings, norms, biases) use plain AdamW.

Two routes, both tested here: by default :meth:`GaloreMethod.create_optimizer` builds galore-torch's
``GaLoreAdamW`` with the target weights in a projected parameter group (works for ``nn.Linear`` and GPT-2's
``Conv1D``); with ``layerwise: true`` the Trainer's ``optim="galore_adamw_layerwise"`` is used instead (one
optimizer per parameter, stepped in a gradient hook; ``nn.Linear`` targets only, no gradient accumulation).
``galore_adamw_8bit`` needs CUDA (it calls ``torch.cuda.synchronize``), so ``train.optim: adamw_8bit`` is refused
on a machine without it.
"""

from __future__ import annotations

from typing import Any

from tuneforge.config.methods import GaloreMethodConfig
from tuneforge.errors import UserError
from tuneforge.methods.base import Method, register
from tuneforge.methods.optim import matching_modules
from tuneforge.methods.optimizers import refuse_embedding_lr


class GaloreMethod(Method):
    """Full fine-tuning with GaLore's gradient low-rank projection on the target weight matrices."""

    reference = "Zhao et al., 2024 — GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"
    mergeable = False
    is_adapter = False
    priced_as = "galore"
    owns_optimizer = True  # the projected optimizer (or the Trainer's layer-wise GaLore optimizer)
    shardable = False  # it projects whole, unsharded gradients

    def __init__(self) -> None:
        self._target_names: list[str] | None = None

    def apply(self, model: Any, cfg: Any) -> Any:
        """Make every parameter trainable and remember which weight matrices GaLore projects.

        Raises:
            UserError: no target module found; ``layerwise`` with non-``nn.Linear`` targets.
        """
        model.requires_grad_(True)
        self._target_names = target_weight_names(model, cfg)
        if cfg.layerwise:
            import torch

            modules = dict(model.named_modules())
            odd = [n for n in self._target_names if not isinstance(modules[n.removesuffix(".weight")], torch.nn.Linear)]
            if odd:
                raise UserError(
                    "method.layerwise: the Trainer's galore_adamw_layerwise only projects nn.Linear layers, but "
                    f"these targets are not: {', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''} "
                    "(GPT-2 uses Conv1D); set method.layerwise: false"
                )
        return model

    def create_optimizer(self, model: Any, cfg: Any, train_cfg: Any) -> Any | None:
        """A ``GaLoreAdamW`` (or ``GaLoreAdafactor``) over all trainable parameters; ``None`` when layerwise."""
        refuse_embedding_lr("galore", train_cfg)
        if cfg.layerwise:
            return None  # the Trainer builds it from trainer_args()
        optimizer_cls = galore_optimizer_class(train_cfg)
        names = set(self._target_names or target_weight_names(model, cfg))
        projected, plain = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (projected if name in names and param.ndim == 2 else plain).append(param)
        groups = [
            {"params": plain},
            {"params": projected, "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap,
             "scale": cfg.scale, "proj_type": cfg.proj_type},
        ]
        kwargs = {"lr": train_cfg.lr, "weight_decay": train_cfg.weight_decay}
        if optimizer_cls.__name__ == "GaLoreAdamW":
            kwargs["no_deprecation_warning"] = True
        if optimizer_cls.__name__ == "GaLoreAdafactor":
            kwargs.update(scale_parameter=False, relative_step=False)
        return optimizer_cls(groups, **kwargs)

    def trainer_args(self, cfg: Any) -> dict:
        """For ``layerwise``: the Trainer's ``galore_adamw_layerwise`` optimizer over the target modules."""
        if not cfg.layerwise:
            return {}
        if self._target_names is None:
            raise RuntimeError("GaloreMethod.trainer_args needs apply() to have run on this instance first")
        return {
            "optim": "galore_adamw_layerwise",
            "optim_target_modules": [n.removesuffix(".weight") for n in self._target_names],
            "optim_args": (f"rank={cfg.rank},update_proj_gap={cfg.update_proj_gap},"
                           f"scale={cfg.scale},proj_type={cfg.proj_type}"),
        }


def target_weight_names(model: Any, cfg: Any) -> list[str]:
    """Parameter names (``<module>.weight``) of the weight matrices GaLore projects for ``cfg.target_modules``."""
    targets = GaloreMethod().target_modules(model, cfg)
    names = [f"{name}.weight" for name, module in matching_modules(model, targets).items()
             if getattr(module, "weight", None) is not None and module.weight.ndim == 2]
    if not names:
        raise UserError(f"method.target_modules: {cfg.target_modules!r} selects no weight matrix for GaLore")
    return names


def galore_optimizer_class(train_cfg: Any) -> type:
    """The galore-torch optimizer for ``train.optim``.

    Raises:
        UserError: galore-torch missing (names the package), or an 8-bit optimizer without CUDA.
    """
    try:
        import galore_torch
    except ImportError:
        raise UserError(
            "method galore needs galore-torch — install it with `pip install galore-torch==1.0` "
            "(or `pip install tuneforge[quant]`)"
        ) from None
    optim = getattr(train_cfg, "optim", "adamw_torch")
    if optim == "adamw_torch":
        return galore_torch.GaLoreAdamW
    if optim == "adafactor":
        return galore_torch.GaLoreAdafactor
    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"train.optim: {optim!r} with method galore needs GaLoreAdamW8bit, which requires CUDA "
                "(it calls torch.cuda.synchronize); use train.optim: adamw_torch on this machine"
            )
        return galore_torch.GaLoreAdamW8bit
    raise UserError(f"train.optim: {optim!r} cannot be combined with method galore; use adamw_torch or adafactor")


register(GaloreMethodConfig, GaloreMethod)
