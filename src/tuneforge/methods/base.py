"""The method registry and the contract every fine-tuning method fulfils.

A method is its config class (pydantic, ``name: Literal["<name>"]``, in the pure module
:mod:`tuneforge.config.methods`, which the config schema's ``method:`` union is built from) and one module of this
package holding its implementation (a :class:`Method` subclass), made known by one call,
``register(ConfigClass, MethodClass)``. The CLI choices and the estimator's method list are read from here; a test
keeps this registry and ``config.methods.METHOD_CONFIGS`` in agreement. Method modules import torch/peft only
inside functions, so listing the registry stays instant.

The trainer calls, in order:

1. ``model_load_kwargs(cfg, dtype)`` → extra kwargs for ``from_pretrained`` (e.g. a ``BitsAndBytesConfig``);
2. ``apply(model, cfg)`` → the model to train (a ``peft.PeftModel`` for adapters, the model itself for ``full``);
3. ``create_optimizer(model, cfg, train_cfg)`` → an optimizer, or ``None`` for the Trainer's default;
4. ``callbacks(cfg, total_steps)`` → extra ``TrainerCallback`` objects (e.g. AdaLoRA's budget schedule);
5. ``trainer_args(cfg)`` → extra ``TrainingArguments`` kwargs (e.g. GaLore's ``optim``);
6. ``save_adapter(model, out_dir)`` → the final result (PiSSA/OLoRA convert theirs for the original base).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tuneforge.config.methods import METHOD_CONFIGS
from tuneforge.errors import UserError, did_you_mean


@dataclass(frozen=True)
class Capabilities:
    """What a method (with its config) can do; see the declarations on :class:`Method`.

    Recorded in every run's manifest (``tuneforge_run.json``, key ``capabilities``) so that readers of run
    directories (merge, evaluate, serve), which never import methods, know them too.
    """

    quantized_base: bool = False
    changes_base: bool = False
    owns_optimizer: bool = False
    shardable: bool = True
    mergeable: bool = False

    def as_dict(self) -> dict[str, bool]:
        """``{"quantized_base": ..., ...}`` (for the run manifest)."""
        return dict(self.__dict__)


class Method:
    """Base class: a method that trains every parameter and needs nothing special."""

    name: ClassVar[str] = ""
    #: the paper, shown by `tuneforge inspect` and in docs
    reference: ClassVar[str] = ""
    #: whether the trained adapter can be folded into the base weights
    mergeable: ClassVar[bool] = False
    #: whether the result is a PEFT adapter (saved in PEFT format) rather than a full model
    is_adapter: ClassVar[bool] = False
    #: how ``tuneforge estimate`` prices the method: ``full``, ``galore``, ``lora``, ``dora``, ``qlora``, or
    #: ``None`` when the estimator has no model for it
    priced_as: ClassVar[str | None] = None
    # What the method can do, declared here and read by the trainer, the distributed checks, progressive runs and
    # (recorded in the run's manifest) merge — never inferred from the method's name. tests/test_methods_capabilities
    # checks every declaration against what the method does.
    #: the base model is loaded quantized (4/8-bit) and frozen under the adapter (QLoRA)
    quantized_base: ClassVar[bool] = False
    #: the method changes the base weights it trains against (PiSSA; LoRA's ``init: pissa``/``olora``), so its
    #: adapter is converted for the original base when saved
    changes_base: ClassVar[bool] = False
    #: the method builds its own optimizer (GaLore, LoRA+) instead of the Trainer's
    owns_optimizer: ClassVar[bool] = False
    #: trains under FSDP / DeepSpeed, which shard parameters, gradients and optimizer state across processes
    shardable: ClassVar[bool] = True

    def capabilities(self, cfg: Any = None) -> Capabilities:
        """The method's declared capabilities for its config ``cfg`` (the class declarations when ``None``).

        A method whose abilities depend on an option overrides this (LoRA with ``init: pissa`` changes the base).
        """
        return Capabilities(quantized_base=self.quantized_base, changes_base=self.changes_base,
                            owns_optimizer=self.owns_optimizer, shardable=self.shardable, mergeable=self.mergeable)

    def model_load_kwargs(self, cfg: Any, dtype: Any) -> dict:
        return {}

    def apply(self, model: Any, cfg: Any) -> Any:
        raise NotImplementedError

    def target_modules(self, model: Any, cfg: Any) -> list[str] | None:
        """The module-name suffixes the method adapts on ``model`` (``None``: it has no target modules)."""
        from tuneforge.models.targets import resolve_target_modules

        spec = getattr(cfg, "target_modules", None)
        return None if spec is None else resolve_target_modules(model, spec)

    def create_optimizer(self, model: Any, cfg: Any, train_cfg: Any) -> Any | None:
        from tuneforge.methods.optimizers import embedding_lr_optimizer

        return embedding_lr_optimizer(model, train_cfg)  # None (the Trainer's own) unless train.embedding_lr

    def callbacks(self, cfg: Any, total_steps: int) -> list:
        return []

    def trainer_args(self, cfg: Any) -> dict:
        return {}

    def save_adapter(self, model: Any, out_dir: Any) -> None:
        """Save the trained result (adapter or full model) so that it loads onto the original base model."""
        model.save_pretrained(str(out_dir), **adapter_save_kwargs(model))


def adapter_save_kwargs(model: Any) -> dict:
    """``save_pretrained`` keyword arguments for ``model``: for a peft model whose base is a local directory,
    ``save_embedding_layers`` is True only when the embedding's size differs from that base's vocabulary.

    Why: peft's ``"auto"`` saves the whole base embedding and output weights whenever an embedding layer is a LoRA
    target, although they equal the base's (the quickstart's adapter was 6 MB instead of 1.6 MB). When the
    vocabulary was resized they are needed, and they are kept; for hub bases peft's own rule stays.
    """
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    base = getattr(config, "base_model_name_or_path", None)
    if not base or not (Path(base) / "config.json").is_file() or not hasattr(model, "get_input_embeddings"):
        return {}
    from transformers import AutoConfig

    base_config = AutoConfig.from_pretrained(base)
    vocab = getattr(base_config, "vocab_size", None) or getattr(base_config.get_text_config(), "vocab_size", None)
    if not vocab:
        return {}
    return {"save_embedding_layers": model.get_input_embeddings().weight.shape[0] != vocab}


@dataclass(frozen=True)
class Registration:
    """One method: its config class and its implementation (``None`` for ``auto``, resolved before training)."""

    name: str
    config: type
    method: type[Method] | None


_REGISTRY: dict[str, Registration] = {}
_discovered = False


def register(config: type, method: type[Method] | None = None) -> None:
    """Make a method available as ``method.name: <name>``; the name is the config class's ``name`` literal, and the
    class must be the one :data:`tuneforge.config.methods.METHOD_CONFIGS` lists for it (the schema validates with
    that one)."""
    (name,) = config.model_fields["name"].annotation.__args__
    if METHOD_CONFIGS.get(name) is not config:
        raise ValueError(f"method {name!r}: its config class must be declared in tuneforge.config.methods")
    if method is not None:
        method.name = name
    _REGISTRY[name] = Registration(name, config, method)


def registrations() -> dict[str, Registration]:
    """Every registered method by name (sorted), after importing every method module of this package once."""
    global _discovered
    if not _discovered:
        package = importlib.import_module("tuneforge.methods")
        for module in pkgutil.iter_modules(package.__path__):  # helper modules (optim) register nothing
            importlib.import_module(f"tuneforge.methods.{module.name}")
        _discovered = True
    return dict(sorted(_REGISTRY.items()))


def known_methods() -> list[str]:
    """Every method that trains (the names :func:`get_method` accepts; ``auto`` is resolved before training)."""
    return [name for name, reg in registrations().items() if reg.method is not None]


def priced_methods() -> list[str]:
    """The methods ``tuneforge estimate`` can price."""
    return [name for name, reg in registrations().items() if reg.method is not None and reg.method.priced_as]


def method_class(name: str) -> type[Method]:
    """The implementation class of method ``name``.

    Raises:
        UserError: for an unknown name (or ``auto``), listing the known ones.
    """
    reg = registrations().get(name)
    if reg is None or reg.method is None:
        known = known_methods()
        why = " (it is resolved to a concrete method before training)" if reg is not None else ""
        raise UserError(f"unknown method {name!r}{why}{did_you_mean(name, known)}; known: {', '.join(known)}")
    return reg.method


def get_method(name: str) -> Method:
    """An instance of the registered method ``name``.

    Raises:
        UserError: for an unknown name, listing the known ones.
    """
    return method_class(name)()
