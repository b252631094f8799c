"""Every fine-tuning method's config class: the ``method:`` section of a run config (pure: no torch).

The method registry (:mod:`tuneforge.methods.base`) pairs each class with its implementation, ``register(Config,
Method)`` in the method's module; the schema's ``method:`` union and ``METHOD_NAMES`` are read from
:data:`METHOD_CONFIGS` here, so that the config stays below the methods (docs/architecture.md, layers).
A new method is one class here (``name: Literal["<name>"]``) plus one module of ``tuneforge.methods``;
tests/test_methods_registry.py checks that both sides list the same names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneforge.config.strict import Strict

#: target-module groups of ``method.target_modules`` (resolved per architecture by ``tuneforge.models.targets``)
TARGET_GROUPS = ("attention", "mlp", "all-linear")

#: ``method.target_modules``: a group or explicit module names
TargetModules = Literal[TARGET_GROUPS] | list[str]


class AutoMethodConfig(Strict):
    """Let ``tuneforge estimate`` choose the method that fits ``train.memory_budget_gb``."""

    name: Literal["auto"]
    r: int = Field(16, gt=0, description="LoRA/QLoRA rank, imposed only when written in the config")


class FullMethodConfig(Strict):
    """Full fine-tuning: every parameter trains."""

    name: Literal["full"]


class LoraMethodConfig(Strict):
    """LoRA (Hu et al., 2021) and the options of its LoRA-family variants (dora, rslora, pissa, lora_plus and qlora
    inherit this class).

    ``per_task`` and ``continue_from`` shape the run rather than the adapter and are handled by ``tuneforge.train``
    (docs/multitask.md): one adapter per task of the data (``runs/<name>/tasks/<task>/``, ``train/per_task.py``),
    and progressive LoRA (the earlier run's adapter stack merged, frozen, into the base; a new adapter trained on
    top; the earlier adapters kept in ``runs/<name>/stack/NN/``). qlora refuses ``continue_from`` at training time
    (a quantized base cannot hold an exact merge).
    """

    name: Literal["lora"]
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: TargetModules = "all-linear"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    per_task: bool = Field(False, description="train one adapter per task (the records' `task` field) on one base")
    continue_from: str | None = Field(
        None, description="progressive LoRA: an earlier run whose adapter stack is frozen under the new adapter")


class DoraMethodConfig(LoraMethodConfig):
    """DoRA (Liu et al., 2024): weight-decomposed LoRA (magnitude + direction)."""

    name: Literal["dora"]  # type: ignore[assignment]


class RsLoraMethodConfig(LoraMethodConfig):
    """rsLoRA (Kalajdzievski, 2023): scaling alpha/sqrt(r) instead of alpha/r."""

    name: Literal["rslora"]  # type: ignore[assignment]


class PissaMethodConfig(LoraMethodConfig):
    """PiSSA (Meng et al., 2024): LoRA initialised from the principal singular vectors."""

    name: Literal["pissa"]  # type: ignore[assignment]
    niter: int | None = Field(None, gt=0, description="fast SVD iterations; None = full SVD")


class LoraPlusMethodConfig(LoraMethodConfig):
    """LoRA+ (Hayou et al., 2024): B gets lr * lr_ratio."""

    name: Literal["lora_plus"]  # type: ignore[assignment]
    lr_ratio: float = Field(16.0, gt=0)
    lr_embedding: float | None = Field(None, gt=0)


class QLoraMethodConfig(LoraMethodConfig):
    """QLoRA (Dettmers et al., 2023): LoRA over a 4-bit NF4 base with double quantization."""

    name: Literal["qlora"]  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    bits: Literal[4, 8] = 4


class AdaLoraMethodConfig(Strict):
    """AdaLoRA (Zhang et al., 2023): SVD-form LoRA whose rank budget is reallocated during training."""

    name: Literal["adalora"]
    init_r: int = Field(12, gt=0)
    target_r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    tinit: int = Field(0, ge=0, description="steps of warm-up before budget pruning")
    tfinal: int = Field(0, ge=0, description="steps of final fine-tuning after pruning")
    delta_t: int = Field(1, gt=0, description="steps between two budget allocations")
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    target_modules: TargetModules = "attention"

    @model_validator(mode="after")
    def _ranks(self) -> AdaLoraMethodConfig:
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        return self


class GaloreMethodConfig(Strict):
    """GaLore (Zhao et al., 2024): full-parameter training with low-rank projected optimizer states."""

    name: Literal["galore"]
    rank: int = Field(128, gt=0)
    update_proj_gap: int = Field(200, gt=0)
    scale: float = Field(0.25, gt=0)
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"
    target_modules: TargetModules = "all-linear"
    layerwise: bool = False


class Ia3MethodConfig(Strict):
    """IA3 (Liu et al., 2022): learned rescaling vectors on keys, values and the MLP."""

    name: Literal["ia3"]
    target_modules: TargetModules | None = None
    feedforward_modules: list[str] | None = None


class VeraMethodConfig(Strict):
    """VeRA (Kopiczko et al., 2024): shared frozen random matrices, trained scaling vectors."""

    name: Literal["vera"]
    r: int = Field(256, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    d_initial: float = 0.1
    target_modules: TargetModules | None = Field(
        None, description="default: the attention projections of the most common shape"
    )
    allow_unequal_shapes: bool = Field(
        False, description="let peft share A/B of the largest target shape, sliced per module (not in the paper)"
    )


class PrefixTuningMethodConfig(Strict):
    """Prefix tuning (Li & Liang, 2021): trained key/value prefixes in every layer."""

    name: Literal["prefix_tuning"]
    num_virtual_tokens: int = Field(16, gt=0)
    prefix_projection: bool = False


#: every method's config class by ``method.name`` (``auto`` included: resolved before training)
METHOD_CONFIGS: dict[str, type[Strict]] = {
    cls.model_fields["name"].annotation.__args__[0]: cls for cls in (
        AutoMethodConfig,
        FullMethodConfig,
        LoraMethodConfig,
        DoraMethodConfig,
        RsLoraMethodConfig,
        PissaMethodConfig,
        LoraPlusMethodConfig,
        QLoraMethodConfig,
        AdaLoraMethodConfig,
        GaloreMethodConfig,
        Ia3MethodConfig,
        VeraMethodConfig,
        PrefixTuningMethodConfig,
    )
}
