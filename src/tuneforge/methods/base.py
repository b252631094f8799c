"""The method registry and the contract every fine-tuning method fulfils.

A method is a class registered under its config name (``method.name``). The trainer calls, in order:

1. ``model_load_kwargs(cfg, dtype)`` → extra kwargs for ``from_pretrained`` (e.g. a ``BitsAndBytesConfig``);
2. ``apply(model, cfg)`` → the model to train (a ``peft.PeftModel`` for adapters, the model itself for ``full``);
3. ``create_optimizer(model, cfg, train_cfg)`` → an optimizer, or ``None`` for the Trainer's default;
4. ``callbacks(cfg, total_steps)`` → extra ``TrainerCallback`` objects (e.g. AdaLoRA's budget schedule);
5. ``trainer_args(cfg)`` → extra ``TrainingArguments`` kwargs (e.g. GaLore's ``optim``).

Adding a method = one module in this package + ``@register("name")`` + one row in the shared behaviour test matrix.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

from tuneforge.errors import UserError, did_you_mean

_REGISTRY: dict[str, type[Method]] = {}

# name → module that registers it; imported on first use so `import tuneforge` stays light.
_MODULES = {
    "full": "tuneforge.methods.full",
    "lora": "tuneforge.methods.lora",
    "qlora": "tuneforge.methods.qlora",
    "dora": "tuneforge.methods.dora",
    "rslora": "tuneforge.methods.rslora",
    "pissa": "tuneforge.methods.pissa",
    "lora_plus": "tuneforge.methods.lora_plus",
    "adalora": "tuneforge.methods.adalora",
    "vera": "tuneforge.methods.vera",
    "prefix_tuning": "tuneforge.methods.prefix_tuning",
    "ia3": "tuneforge.methods.ia3",
    "galore": "tuneforge.methods.galore",
}


class Method:
    """Base class: a method that trains every parameter and needs nothing special."""

    name: ClassVar[str] = ""
    #: the paper, shown by `tuneforge inspect` and in docs
    reference: ClassVar[str] = ""
    #: whether the trained adapter can be folded into the base weights
    mergeable: ClassVar[bool] = False
    #: whether the result is a PEFT adapter (saved in PEFT format) rather than a full model
    is_adapter: ClassVar[bool] = False

    def model_load_kwargs(self, cfg: Any, dtype: Any) -> dict:
        return {}

    def apply(self, model: Any, cfg: Any) -> Any:
        raise NotImplementedError

    def create_optimizer(self, model: Any, cfg: Any, train_cfg: Any) -> Any | None:
        return None

    def callbacks(self, cfg: Any, total_steps: int) -> list:
        return []

    def trainer_args(self, cfg: Any) -> dict:
        return {}


def register(name: str):
    """Class decorator: make a :class:`Method` available as ``method.name: <name>``."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def known_methods() -> list[str]:
    """Every method name that can be put in ``method.name`` (besides ``auto``)."""
    return sorted(_MODULES)


def get_method(name: str) -> Method:
    """An instance of the registered method ``name``.

    Raises:
        UserError: for an unknown name, listing the known ones.
    """
    if name not in _REGISTRY:
        module = _MODULES.get(name)
        if module is None:
            raise UserError(
                f"unknown method {name!r}{did_you_mean(name, _MODULES)}; known: {', '.join(known_methods())}"
            )
        importlib.import_module(module)
    return _REGISTRY[name]()
