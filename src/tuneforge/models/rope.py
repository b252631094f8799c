"""RoPE scaling (``model.rope_scaling``): train and run a model beyond the context it was pre-trained at.

Rotary position embeddings rotate query/key pairs by ``position * theta_i``. Beyond the trained context the model
sees rotation angles it never saw; scaling maps the longer range back onto the trained one:

* ``linear`` (position interpolation, Chen et al., 2023, arXiv:2306.15595): every frequency divided by ``factor``;
* ``dynamic`` (dynamic NTK): the base grows with the sequence once it passes the trained context (nothing changes
  below it; the model's ``max_position_embeddings`` stays the trained context, which the formula is relative to);
* ``yarn`` (Peng et al., 2023, arXiv:2309.00071): NTK-by-parts interpolation plus an attention temperature;
* ``llama3``: Llama 3.1's by-wavelength interpolation (``low_freq_factor`` 1, ``high_freq_factor`` 4).

``auto`` picks the family's type (``llama3`` for models already using it, ``yarn`` for the Qwen families whose model
cards prescribe it, ``linear`` otherwise) and the factor ``ceil(data.max_length / original context)``, and only when
``data.max_length`` exceeds the context; otherwise nothing changes. In transformers 5.x scaling is expressed as the
config's ``rope_parameters`` (``rope_type``, ``factor``, ``rope_theta``, ``original_max_position_embeddings``);
``rope_scaling`` is its deprecated alias.

The resolved value (``"none"`` or ``{type, factor, original_max_position_embeddings}``) is what a run records in its
``config.yaml``; :func:`apply_rope_scaling` writes it into a transformers config before the model is built, so the
saved ``config.json`` of a full model (and of the base a from-config adapter run saves) carries it, and
:func:`tuneforge.models.reference.load_base_model` re-applies it under an adapter.
"""

from __future__ import annotations

import math
from typing import Any

from tuneforge.errors import UserError

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
#: model_type prefixes whose model cards prescribe YaRN for long context
_YARN_FAMILIES = ("qwen2", "qwen3")


def rope_of(config: Any) -> dict | None:
    """The RoPE parameters of a transformers config (``{"rope_type", "rope_theta", ...}``), or ``None`` for a model
    without rotary embeddings (GPT-2, OPT, BLOOM...)."""
    params = getattr(config, "rope_parameters", None)
    if params is None and getattr(config, "rope_theta", None) is None:
        return None
    return dict(params or {"rope_type": "default", "rope_theta": config.rope_theta})


def context_of(config: Any) -> int | None:
    """The positions a config allows (``max_position_embeddings``, ``n_positions``...)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_rope_scaling(model_cfg: Any, max_length: int | None, config: Any) -> str | dict:
    """``model.rope_scaling`` made concrete for this model and ``data.max_length``.

    Args:
        model_cfg: the run's ``model`` section.
        max_length: ``data.max_length`` (needed for ``auto``).
        config: the model's transformers config (:func:`tuneforge.models.load.model_config_of` reads it).

    Returns:
        ``"none"``, or ``{"type", "factor", "original_max_position_embeddings"}``.

    Raises:
        UserError: scaling asked of a model without rotary embeddings (naming the family), or ``auto`` on a model
            already scaled whose context ``data.max_length`` still exceeds.
    """
    spec = model_cfg.rope_scaling
    if spec == "none":
        return "none"
    family = getattr(config, "model_type", "?")
    rope = rope_of(config)
    context = context_of(config)
    if rope is None:
        if spec == "auto" and (max_length is None or context is None or max_length <= context):
            return "none"
        raise UserError(
            f"model.rope_scaling: {family} models have no rotary position embeddings (RoPE), so they cannot be "
            f"scaled to a longer context{f' than {context} positions' if context else ''}; use data.max_length <= "
            f"{context or 'the model context'} (and model.rope_scaling: none), or a RoPE model (llama, qwen2, mistral...)"
        )
    current = rope.get("rope_type", rope.get("type", "default"))
    original = rope.get("original_max_position_embeddings") if current != "default" else None
    if spec == "auto":
        if max_length is None:
            raise UserError("model.rope_scaling: auto needs data.max_length (the length to reach)")
        if context is None or max_length <= context:
            return "none"  # the model already reaches data.max_length: nothing to scale
        if current not in ("default", "llama3"):
            raise UserError(
                f"model.rope_scaling: auto — the model is already scaled ({current}, factor {rope.get('factor')}, "
                f"{context} positions) and data.max_length {max_length} is longer still; give the scaling "
                "explicitly: model.rope_scaling: {type: ..., factor: ...} relative to the pre-trained context"
            )
        original = original or context
        kind = "llama3" if current == "llama3" else "yarn" if family.startswith(_YARN_FAMILIES) else "linear"
        return {"type": kind, "factor": float(math.ceil(max_length / original)),
                "original_max_position_embeddings": int(original)}
    out = {"type": spec.type, "factor": float(spec.factor),
           "original_max_position_embeddings": int(spec.original_max_position_embeddings or original or context)}
    return out


def scaled_context(resolved: dict) -> int:
    """The positions a resolved scaling reaches (``original × factor``)."""
    return int(math.ceil(resolved["original_max_position_embeddings"] * resolved["factor"]))


def as_dict(rope_scaling: Any) -> dict | None:
    """A resolved ``model.rope_scaling`` (config object or dict) as a plain dict; ``None`` for ``"none"``.

    Raises:
        ValueError: ``"auto"`` (resolve it first with :func:`resolve_rope_scaling`).
    """
    if rope_scaling in (None, "none"):
        return None
    if rope_scaling == "auto":
        raise ValueError("rope_scaling 'auto' must be resolved before it is applied")
    if hasattr(rope_scaling, "model_dump"):
        rope_scaling = rope_scaling.model_dump()
    return dict(rope_scaling)


def apply_rope_scaling(config: Any, rope_scaling: Any) -> Any:
    """Write a resolved scaling into a transformers ``config`` (before the model is built from it): its
    ``rope_parameters`` (rope_theta and other keys kept) and, except for ``dynamic``, ``max_position_embeddings``
    raised to ``original × factor``. Idempotent; returns ``config``.

    Raises:
        UserError: the config has no rotary embeddings.
    """
    rope = as_dict(rope_scaling)
    if rope is None:
        return config
    params = rope_of(config)
    if params is None:
        raise UserError(f"model.rope_scaling: {getattr(config, 'model_type', '?')} models have no rotary position "
                        "embeddings (RoPE); remove model.rope_scaling")
    original = int(rope["original_max_position_embeddings"])
    params.pop("type", None)
    for key in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                "attention_factor", "beta_fast", "beta_slow"):
        params.pop(key, None)
    params.update(rope_type=rope["type"], factor=float(rope["factor"]))
    if rope["type"] in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    if rope["type"] == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    config.rope_parameters = params
    config.max_position_embeddings = original if rope["type"] == "dynamic" else scaled_context(rope)
    return config


def apply_rope_scaling_to_file(config_file: Any, rope_scaling: Any) -> None:
    """Write a resolved scaling into a saved ``config.json`` (e.g. a merge that copies its base's config as a file),
    as :func:`apply_rope_scaling` does to a config object; nothing for ``None``/``"none"``."""
    import json
    from pathlib import Path

    if as_dict(rope_scaling) is None:
        return
    from transformers import AutoConfig

    path = Path(config_file)
    config = AutoConfig.from_pretrained(str(path.parent))
    apply_rope_scaling(config, rope_scaling)
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("rope_scaling", None)
    data.update(rope_parameters=config.rope_parameters, max_position_embeddings=config.max_position_embeddings)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
